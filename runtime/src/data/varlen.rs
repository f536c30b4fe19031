//! Document boundaries for ArchScale's `_varlen` models (arch-spec §4.3; batch size 1).
//! A document ends *with* its EOS token (id 2 in ArchScale, hard-coded even for phi4).

/// ArchScale's EOS id for varlen boundaries.
pub const ARCHSCALE_EOS: u32 = 2;

/// `[0] ++ (positions of EOS) + 1 ++ [T]`. An EOS at the last position yields a
/// duplicate `T` (an empty final segment), exactly as ArchScale builds it.
pub fn cu_seqlens(tokens: &[u32], eos: u32) -> Vec<usize> {
    let mut cu = Vec::with_capacity(2 + tokens.len() / 64);
    cu.push(0);
    cu.extend(
        tokens
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t == eos)
            .map(|(i, _)| i + 1),
    );
    cu.push(tokens.len());
    cu
}

/// Longest segment of `cu_seqlens` (ArchScale's `max_seqlen`).
pub fn max_seqlen(cu_seqlens: &[usize]) -> usize {
    cu_seqlens
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0)
}

/// Mamba-2 `seq_idx`: for each position, the number of EOS tokens strictly before it.
pub fn seq_idx(tokens: &[u32], eos: u32) -> Vec<u32> {
    let mut seen = 0u32;
    tokens
        .iter()
        .map(|&t| {
            let idx = seen;
            seen += (t == eos) as u32;
            idx
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_follow_archscale() {
        // Documents end with their EOS: [5 6 2] [7 2] [8 9].
        let tokens = [5, 6, 2, 7, 2, 8, 9];
        let cu = cu_seqlens(&tokens, 2);
        assert_eq!(cu, vec![0, 3, 5, 7]);
        assert_eq!(max_seqlen(&cu), 3);
        assert_eq!(seq_idx(&tokens, 2), vec![0, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn eos_at_the_end_duplicates_t() {
        let tokens = [5, 2, 6, 2];
        assert_eq!(cu_seqlens(&tokens, 2), vec![0, 2, 4, 4]);
        assert_eq!(cu_seqlens(&[2], 2), vec![0, 1, 1]);
    }

    #[test]
    fn no_eos_is_one_segment() {
        assert_eq!(cu_seqlens(&[7, 8, 9], 2), vec![0, 3]);
        assert_eq!(cu_seqlens(&[], 2), vec![0, 0]);
        assert_eq!(max_seqlen(&[0, 3]), 3);
    }
}
