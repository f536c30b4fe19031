//! The two random streams ArchScale's data order depends on, reproduced exactly:
//!
//! * [`PyRandom`]: CPython's `random.Random` (MT19937 seeded by `init_by_array`), for
//!   `random.seed(3407); random.shuffle(files)` and `CombinedDataset`'s
//!   `rng.choices(datasets, weights)`.
//! * [`NumpyPcg64`]: NumPy's `np.random.default_rng(seed)` (SeedSequence -> PCG64 XSL-RR),
//!   for `rng.permutation(n_blocks)`.
//!
//! Both states are plain data so a checkpoint can store them and resume the same order.

use serde::{Deserialize, Serialize};

const MT_N: usize = 624;
const MT_M: usize = 397;

/// CPython's Mersenne Twister (`random.Random`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyRandom {
    mt: Box<[u32; MT_N]>,
    index: usize,
}

/// Serializable [`PyRandom`] state (`random.getstate()` without the gauss cache).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PyRandomState {
    pub mt: Vec<u32>,
    pub index: usize,
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> PyRandom {
        // CPython splits abs(seed) into 32-bit words, least significant first, at least one.
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut rng = PyRandom {
            mt: Box::new([0; MT_N]),
            index: MT_N,
        };
        rng.init_genrand(19_650_218);
        let mt = &mut rng.mt;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..MT_N.max(key.len()) {
            let prev = mt[i - 1];
            mt[i] = (mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= MT_N {
                mt[0] = mt[MT_N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..MT_N - 1 {
            let prev = mt[i - 1];
            mt[i] =
                (mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= MT_N {
                mt[0] = mt[MT_N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        rng
    }

    fn init_genrand(&mut self, seed: u32) {
        self.mt[0] = seed;
        for i in 1..MT_N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = MT_N;
    }

    fn regenerate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        let mag = |y: u32| if y & 1 == 1 { 0x9908_b0df } else { 0 };
        let mt = &mut self.mt;
        for k in 0..MT_N {
            let y = (mt[k] & UPPER) | (mt[(k + 1) % MT_N] & LOWER);
            mt[k] = mt[(k + MT_M) % MT_N] ^ (y >> 1) ^ mag(y);
        }
        self.index = 0;
    }

    /// `genrand_uint32`.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.regenerate();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.random()`: 53-bit float in [0, 1).
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `random.getrandbits(k)` for 1 <= k <= 64.
    fn getrandbits(&mut self, k: u32) -> u64 {
        if k <= 32 {
            return (self.next_u32() >> (32 - k)) as u64;
        }
        let low = self.next_u32() as u64;
        let high = (self.next_u32() >> (64 - k)) as u64;
        low | (high << 32)
    }

    /// `random._randbelow(n)` for n >= 1.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.shuffle(x)`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// `random.choices(range(len(weights)), weights, k=1)[0]`. Weights must be finite,
    /// non-negative and not all zero (checked by the caller).
    pub fn choice_weighted(&mut self, cum_weights: &[f64]) -> usize {
        let total = cum_weights[cum_weights.len() - 1];
        let x = self.random() * total;
        let hi = cum_weights.len() - 1;
        // bisect_right(cum_weights, x, 0, hi)
        cum_weights[..hi].partition_point(|&c| c <= x)
    }

    pub fn state(&self) -> PyRandomState {
        PyRandomState {
            mt: self.mt.to_vec(),
            index: self.index,
        }
    }

    pub fn from_state(state: &PyRandomState) -> Option<PyRandom> {
        let mt: [u32; MT_N] = state.mt.as_slice().try_into().ok()?;
        (state.index <= MT_N).then(|| PyRandom {
            mt: Box::new(mt),
            index: state.index,
        })
    }
}

/// NumPy's `SeedSequence(entropy).generate_state(n_words)` (pool size 4, no spawn key).
pub fn seed_sequence_words(entropy: u64, n_words: usize) -> Vec<u32> {
    const INIT_A: u32 = 0x43b0_d7e5;
    const MULT_A: u32 = 0x931e_8875;
    const INIT_B: u32 = 0x8b51_f9dd;
    const MULT_B: u32 = 0x58f3_8ded;
    const MIX_MULT_L: u32 = 0xca01_f9dd;
    const MIX_MULT_R: u32 = 0x4973_f715;
    const POOL: usize = 4;

    let mut words = vec![entropy as u32];
    if entropy >> 32 != 0 {
        words.push((entropy >> 32) as u32);
    }
    let mut hash_const = INIT_A;
    let mut hashmix = |value: u32| {
        let mut value = value ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        value = value.wrapping_mul(hash_const);
        value ^ (value >> 16)
    };
    let mix = |x: u32, y: u32| {
        let r = MIX_MULT_L
            .wrapping_mul(x)
            .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> 16)
    };
    let mut pool = [0u32; POOL];
    for (i, slot) in pool.iter_mut().enumerate() {
        *slot = hashmix(words.get(i).copied().unwrap_or(0));
    }
    for src in 0..POOL {
        for dst in 0..POOL {
            if src != dst {
                pool[dst] = mix(pool[dst], hashmix(pool[src]));
            }
        }
    }
    for &word in words.iter().skip(POOL) {
        for slot in pool.iter_mut() {
            *slot = mix(*slot, hashmix(word));
        }
    }
    let mut hash_const = INIT_B;
    (0..n_words)
        .map(|i| {
            let mut value = pool[i % POOL] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> 16)
        })
        .collect()
}

const PCG_MULT: u128 = 0x2360_ed05_1fc6_5da4_4385_df64_9fcc_f645;

/// NumPy's `PCG64` bit generator as built by `np.random.default_rng(seed)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumpyPcg64 {
    state: u128,
    inc: u128,
    /// Upper half of the last 64-bit draw, kept for the next 32-bit request.
    buffered: Option<u32>,
}

/// Serializable [`NumpyPcg64`] state; 128-bit values as hex strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pcg64State {
    pub state: String,
    pub inc: String,
    pub buffered: Option<u32>,
}

impl NumpyPcg64 {
    /// `np.random.default_rng(seed)`.
    pub fn new(seed: u64) -> NumpyPcg64 {
        let w = seed_sequence_words(seed, 8);
        let word = |k: usize| w[2 * k] as u64 | (w[2 * k + 1] as u64) << 32;
        let initstate = (word(0) as u128) << 64 | word(1) as u128;
        let initseq = (word(2) as u128) << 64 | word(3) as u128;
        let mut rng = NumpyPcg64 {
            state: 0,
            inc: (initseq << 1) | 1,
            buffered: None,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let rot = (self.state >> 122) as u32;
        (((self.state >> 64) as u64) ^ (self.state as u64)).rotate_right(rot)
    }

    pub fn next_u32(&mut self) -> u32 {
        if let Some(high) = self.buffered.take() {
            return high;
        }
        let next = self.next_u64();
        self.buffered = Some((next >> 32) as u32);
        next as u32
    }

    /// NumPy's `random_interval(max)`: uniform in [0, max] by masked rejection.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let value = if max <= u32::MAX as u64 {
                (self.next_u32() as u64) & mask
            } else {
                self.next_u64() & mask
            };
            if value <= max {
                return value;
            }
        }
    }

    /// `rng.permutation(n)` (arange then Fisher-Yates from the end).
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut items: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u64) as usize;
            items.swap(i, j);
        }
        items
    }

    pub fn state(&self) -> Pcg64State {
        Pcg64State {
            state: format!("{:032x}", self.state),
            inc: format!("{:032x}", self.inc),
            buffered: self.buffered,
        }
    }

    pub fn from_state(state: &Pcg64State) -> Option<NumpyPcg64> {
        Some(NumpyPcg64 {
            state: u128::from_str_radix(&state.state, 16).ok()?,
            inc: u128::from_str_radix(&state.inc, 16).ok()?,
            buffered: state.buffered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `import random; r = random.Random(3407); [r.getrandbits(32) for _ in range(3)]`,
    /// `r.random()`, and `random.seed(3407); x = list(range(10)); random.shuffle(x)`
    /// (CPython 3.11).
    #[test]
    fn py_random_matches_cpython() {
        let mut r = PyRandom::new(3407);
        let words: Vec<u32> = (0..3).map(|_| r.next_u32()).collect();
        assert_eq!(words, PY_3407_WORDS);
        let mut r = PyRandom::new(3407);
        assert_eq!(r.random(), PY_3407_RANDOM);
        let mut r = PyRandom::new(3407);
        let mut x: Vec<u32> = (0..10).collect();
        r.shuffle(&mut x);
        assert_eq!(x, PY_3407_SHUFFLE10);
        let mut r = PyRandom::new(3407);
        let cum = [0.2, 0.5, 1.0];
        let picks: Vec<usize> = (0..12).map(|_| r.choice_weighted(&cum)).collect();
        assert_eq!(picks, PY_3407_CHOICES);
        // Wide seeds and wide ranges: `random.Random(2**40 + 3)`, `random.Random(12345)`.
        let mut r = PyRandom::new((1 << 40) + 3);
        assert_eq!([r.next_u32(), r.next_u32()], [943978446, 261273136]);
        let mut r = PyRandom::new(12345);
        let mut x: Vec<u32> = (0..1000).collect();
        r.shuffle(&mut x);
        assert_eq!(x[..8], [669, 944, 291, 633, 922, 752, 781, 258]);
        assert_eq!(r.randbelow(1 << 40), 67652871637);
    }

    #[test]
    fn py_random_state_round_trips() {
        let mut r = PyRandom::new(7);
        for _ in 0..1000 {
            r.next_u32();
        }
        let mut restored = PyRandom::from_state(&r.state()).expect("valid state");
        for _ in 0..2000 {
            assert_eq!(r.next_u32(), restored.next_u32());
        }
    }

    /// `np.random.default_rng(3407)`: `.bit_generator.random_raw(2)` and `.permutation(10)`
    /// (NumPy 2.4).
    #[test]
    fn pcg64_matches_numpy() {
        let mut r = NumpyPcg64::new(3407);
        assert_eq!([r.next_u64(), r.next_u64()], NP_3407_RAW);
        let mut r = NumpyPcg64::new(3407);
        assert_eq!(r.permutation(10), NP_3407_PERM10);
        let mut r = NumpyPcg64::new(3408);
        assert_eq!(r.permutation(20), NP_3408_PERM20);
        // The generator continues across permutations (as across loader refills).
        let mut r = NumpyPcg64::new(5);
        let a = r.permutation(100_000);
        let b = r.permutation(7);
        assert_eq!(a[..1000].iter().map(|&v| v as u64).sum::<u64>(), 49_311_502);
        assert_eq!(a[..5], [96277, 83891, 71835, 28131, 54819]);
        assert_eq!(b, [5, 4, 1, 2, 6, 3, 0]);
        // A seed wider than 32 bits feeds two entropy words.
        let mut r = NumpyPcg64::new((1 << 40) + 3);
        assert_eq!(r.permutation(12), [2, 4, 10, 9, 6, 5, 3, 7, 11, 0, 8, 1]);
    }

    #[test]
    fn pcg64_state_round_trips() {
        let mut r = NumpyPcg64::new(11);
        r.next_u32();
        let mut restored = NumpyPcg64::from_state(&r.state()).expect("valid state");
        assert_eq!(r.permutation(100), restored.permutation(100));
    }

    const PY_3407_WORDS: [u32; 3] = [244111517, 1800916962, 569954085];
    const PY_3407_RANDOM: f64 = 0.056836637998436745;
    const PY_3407_SHUFFLE10: [u32; 10] = [9, 5, 4, 8, 3, 1, 7, 2, 6, 0];
    const PY_3407_CHOICES: [usize; 12] = [0, 0, 1, 1, 2, 1, 2, 2, 1, 1, 1, 0];
    const NP_3407_RAW: [u64; 2] = [2242201122631204086, 6349344285687415233];
    const NP_3407_PERM10: [u32; 10] = [5, 8, 2, 7, 3, 9, 0, 4, 1, 6];
    const NP_3408_PERM20: [u32; 20] = [
        3, 14, 12, 19, 2, 4, 7, 16, 6, 10, 1, 15, 11, 13, 8, 9, 0, 5, 18, 17,
    ];
}
