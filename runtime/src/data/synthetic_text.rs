//! The built-in synthetic TEXT corpus and its byte tokenizer: deterministic, no downloads,
//! shaped so a small model learns the skills the text evals measure.
//!
//! Tokens are bytes: id = byte + [`BYTE_OFFSET`] (3..=258); 1 = BOS (the shard separator),
//! 2 = EOS (ends every document), as in the id corpus, so any model with a vocabulary of at
//! least [`VOCAB_SIZE`] = 259 reads it (the quickstart's 512 does).
//!
//! Documents (the corpus seed picks them; the grammar and word lists are fixed):
//!
//! * prose (30%): paragraphs of English-like sentences from a small fixed grammar
//!   ("The old miller walks to the river.", "The baker counts 12 apples."), mixed with the
//!   haystack sentences of the needle-in-a-haystack eval ("The grass is green.");
//! * phonebook (40%): `First Last: dddddddddd` lines, a blank line, two example look-ups,
//!   a blank line, then one to three look-ups — the layout of the Phonebook eval
//!   (`eval::phonebook`), names from the same built-in lists, numbers fresh per book;
//! * key-value recall (30%): the single-needle eval's layout (`eval::niah`): its header,
//!   haystack sentences with one or two needles "One of the special magic numbers for
//!   {adjective-noun} is: {7 digits}.", the question for one key and the answer.
//!
//! So a model that learns to copy from its context answers Phonebook and NIAH prompts of
//! its training length. As in the id corpus, the generator adds up `-ln p` of its random
//! choices, an upper bound on the entropy per token (written to `synthetic.json`).

use super::synthetic::{Categorical, Documents, Source, BOS, EOS};
use crate::eval::names::{ADJECTIVES, FIRST, LAST, NOUNS};
use crate::eval::niah::NOISE;

/// Changes whenever the generated tokens would change.
pub const GENERATOR: &str = "archscale-synthetic-text-v1";
/// Byte `b` is token `b + BYTE_OFFSET`; ids below it are specials (0 unused, BOS, EOS).
pub const BYTE_OFFSET: u32 = 3;
/// Ids in use: 3 specials + 256 bytes.
pub const VOCAB_SIZE: usize = 256 + BYTE_OFFSET as usize;
pub const TEXT_BOS: u32 = BOS;
pub const TEXT_EOS: u32 = EOS;

/// Appends the byte tokens of `text`.
pub fn encode_bytes(text: &[u8], out: &mut Vec<u32>) {
    out.extend(text.iter().map(|&b| b as u32 + BYTE_OFFSET));
}

/// The bytes of `ids`: specials are dropped, ids past the byte range (vocabulary padding)
/// become U+FFFD.
pub fn decode_bytes(ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        match id.checked_sub(BYTE_OFFSET) {
            None => {}
            Some(b) if b < 256 => out.push(b as u8),
            Some(_) => out.extend_from_slice("\u{FFFD}".as_bytes()),
        }
    }
    out
}

/// The needle eval's fixed text (`eval::niah::render`).
pub(crate) const NIAH_HEADER: &str =
    "Some special magic numbers are hidden within the following text. \
     Make sure to memorize it. I will quiz you about the numbers afterwards.";

const DETERMINERS: [&str; 4] = ["the", "a", "one", "every"];
const ADJS: [&str; 12] = [
    "old", "young", "small", "tall", "quiet", "bright", "tired", "clever", "brave", "kind",
    "happy", "busy",
];
const AGENTS: [&str; 12] = [
    "miller", "farmer", "child", "dog", "cat", "sailor", "teacher", "baker", "horse", "bird",
    "king", "girl",
];
const PLACES: [&str; 12] = [
    "river", "mill", "house", "garden", "harbor", "market", "forest", "hill", "road", "school",
    "field", "bridge",
];
const THINGS: [&str; 8] = [
    "apple", "letter", "basket", "lamp", "coin", "book", "boat", "stone",
];
const COLORS: [&str; 6] = ["green", "blue", "yellow", "red", "white", "dark"];
const INTRANSITIVE: [&str; 6] = ["sleeps", "sings", "waits", "runs", "laughs", "rests"];
const TRANSITIVE: [&str; 6] = ["sees", "finds", "helps", "follows", "calls", "watches"];
const MOTIONS: [&str; 5] = ["walks to", "runs to", "goes to", "looks at", "sits by"];

/// Deterministic stream of text documents in byte tokens.
pub struct TextGenerator {
    source: Source,
    kind: Categorical,
    sentence: Categorical,
    tokens: u64,
    text: String,
}

impl TextGenerator {
    /// Stream `stream` (0 train, 1 validation) of corpus `seed`.
    pub fn new(seed: u64, stream: u64) -> TextGenerator {
        TextGenerator {
            source: Source::new(seed, stream),
            kind: Categorical::new(&[0.3, 0.4, 0.3]),
            sentence: Categorical::new(&[0.15, 0.2, 0.25, 0.15, 0.1, 0.15]),
            tokens: 0,
            text: String::with_capacity(1024),
        }
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.source.uniform(words.len() as u32) as usize]
    }

    fn digits(&mut self, out: &mut String, first: std::ops::RangeInclusive<u32>, rest: usize) {
        let span = first.end() - first.start() + 1;
        let d = first.start() + self.source.uniform(span);
        out.push(char::from(b'0' + d as u8));
        for _ in 0..rest {
            out.push(char::from(b'0' + self.source.uniform(10) as u8));
        }
    }

    fn noun_phrase(&mut self, out: &mut String, words: &[&'static str], capital: bool) {
        let det = self.pick(&DETERMINERS);
        let mut det = det.to_string();
        if capital {
            det[..1].make_ascii_uppercase();
        }
        out.push_str(&det);
        out.push(' ');
        if self.source.bernoulli(0.5) {
            out.push_str(self.pick(&ADJS));
            out.push(' ');
        }
        out.push_str(self.pick(words));
    }

    /// One sentence of the grammar, ending with '.'.
    fn sentence(&mut self, out: &mut String, noise_at: &mut usize) {
        match self.sentence.sample(&mut self.source) {
            0 => {
                self.noun_phrase(out, &AGENTS, true);
                out.push(' ');
                out.push_str(self.pick(&INTRANSITIVE));
            }
            1 => {
                self.noun_phrase(out, &AGENTS, true);
                out.push(' ');
                out.push_str(self.pick(&TRANSITIVE));
                out.push(' ');
                let words: &[&'static str] = if self.source.bernoulli(0.5) {
                    &AGENTS
                } else {
                    &THINGS
                };
                self.noun_phrase(out, words, false);
            }
            2 => {
                self.noun_phrase(out, &AGENTS, true);
                out.push(' ');
                out.push_str(self.pick(&MOTIONS));
                out.push_str(" the ");
                out.push_str(self.pick(&PLACES));
            }
            3 => {
                out.push_str("The ");
                out.push_str(self.pick(&PLACES));
                out.push_str(" is ");
                out.push_str(self.pick(&COLORS));
            }
            4 => {
                out.push_str("The ");
                out.push_str(self.pick(&AGENTS));
                out.push_str(" counts ");
                let n = 2 + self.source.uniform(98);
                out.push_str(&n.to_string());
                out.push(' ');
                out.push_str(self.pick(&THINGS));
                out.push('s');
            }
            _ => {
                // The haystack sentences, in their fixed order.
                let noise: Vec<&str> = NOISE.split_inclusive('.').map(str::trim).collect();
                out.push_str(noise[*noise_at % noise.len()].trim_end_matches('.'));
                *noise_at += 1;
            }
        }
        out.push('.');
    }

    fn prose(&mut self, out: &mut String) {
        let paragraphs = 1 + self.source.uniform(3);
        let mut noise_at = 0;
        for p in 0..paragraphs {
            if p > 0 {
                out.push('\n');
            }
            let sentences = 2 + self.source.uniform(5);
            for s in 0..sentences {
                if s > 0 {
                    out.push(' ');
                }
                self.sentence(out, &mut noise_at);
            }
        }
        out.push('\n');
    }

    fn phonebook(&mut self, out: &mut String) {
        let size = 2 + self.source.uniform(11) as usize;
        let mut names: Vec<(usize, usize)> = Vec::with_capacity(size);
        while names.len() < size {
            let name = (
                self.source.uniform(FIRST.len() as u32) as usize,
                self.source.uniform(LAST.len() as u32) as usize,
            );
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let mut lines = Vec::with_capacity(size);
        for &(f, l) in &names {
            let mut line = format!("{} {}: ", FIRST[f], LAST[l]);
            self.digits(&mut line, 6..=9, 9);
            lines.push(line);
        }
        out.push_str(&lines.join("\n"));
        out.push_str("\n\n");
        for _ in 0..2 {
            let i = self.source.uniform(size as u32) as usize;
            out.push_str(&lines[i]);
            out.push('\n');
        }
        out.push('\n');
        let queries = 1 + self.source.uniform(3);
        for _ in 0..queries {
            let i = self.source.uniform(size as u32) as usize;
            out.push_str(&lines[i]);
            out.push('\n');
        }
    }

    fn needle(&mut self, out: &mut String) {
        let noise: Vec<&str> = NOISE.split_inclusive('.').map(str::trim).collect();
        let n_sentences = self.source.uniform(9) as usize;
        let n_needles = if self.source.bernoulli(0.3) { 2 } else { 1 };
        let mut needles: Vec<(usize, String, String)> = Vec::with_capacity(2);
        while needles.len() < n_needles {
            let key = format!("{}-{}", self.pick(&ADJECTIVES), self.pick(&NOUNS));
            if needles.iter().any(|(_, k, _)| *k == key) {
                continue;
            }
            let at = self.source.uniform(n_sentences as u32 + 1) as usize;
            let mut value = String::with_capacity(7);
            self.digits(&mut value, 1..=9, 6);
            needles.push((at, key, value));
        }
        let mut parts: Vec<String> = Vec::with_capacity(n_sentences + 2);
        for i in 0..=n_sentences {
            for (at, key, value) in &needles {
                if *at == i {
                    parts.push(format!(
                        "One of the special magic numbers for {key} is: {value}."
                    ));
                }
            }
            if i < n_sentences {
                parts.push(noise[i % noise.len()].to_string());
            }
        }
        let asked = self.source.uniform(n_needles as u32) as usize;
        let (_, key, value) = &needles[asked];
        out.push_str(NIAH_HEADER);
        out.push('\n');
        out.push_str(&parts.join(" "));
        out.push_str(&format!(
            "\nWhat are all the special magic numbers for {key} mentioned in the provided text? \
             The special magic numbers for {key} mentioned in the provided text are {value}.\n"
        ));
    }

    /// Appends one document in byte tokens, ending with EOS.
    pub fn document(&mut self, out: &mut Vec<u32>) {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        match self.kind.sample(&mut self.source) {
            0 => self.prose(&mut text),
            1 => self.phonebook(&mut text),
            _ => self.needle(&mut text),
        }
        let start = out.len();
        encode_bytes(text.as_bytes(), out);
        out.push(TEXT_EOS);
        self.tokens += (out.len() - start) as u64;
        self.text = text;
    }

    /// Entropy of the generating process so far, nats per token (an upper bound: redrawn
    /// duplicate names are counted too).
    pub fn entropy_per_token(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.source.neg_log_prob / self.tokens as f64
        }
    }
}

impl Documents for TextGenerator {
    fn document(&mut self, out: &mut Vec<u32>) {
        TextGenerator::document(self, out)
    }
    fn entropy_per_token(&self) -> f64 {
        TextGenerator::entropy_per_token(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{ensure_corpus_of, CorpusKind, MANIFEST};
    use crate::eval::niah;

    fn text(seed: u64, stream: u64, docs: usize) -> Vec<String> {
        let mut g = TextGenerator::new(seed, stream);
        (0..docs)
            .map(|_| {
                let mut ids = Vec::new();
                g.document(&mut ids);
                assert_eq!(ids.pop(), Some(TEXT_EOS));
                assert!(ids
                    .iter()
                    .all(|&t| (BYTE_OFFSET..VOCAB_SIZE as u32).contains(&t)));
                String::from_utf8(decode_bytes(&ids)).expect("ASCII text")
            })
            .collect()
    }

    #[test]
    fn bytes_round_trip_and_specials_are_dropped() {
        let mut ids = vec![TEXT_BOS];
        encode_bytes("Mary Smith: 6123456789\n".as_bytes(), &mut ids);
        ids.push(TEXT_EOS);
        assert_eq!(ids[1], b'M' as u32 + 3);
        assert_eq!(decode_bytes(&ids), b"Mary Smith: 6123456789\n");
        assert_eq!(decode_bytes(&[300]), "\u{FFFD}".as_bytes());
    }

    #[test]
    fn documents_are_reproducible_and_have_every_kind() {
        let a = text(5, 0, 200);
        assert_eq!(a, text(5, 0, 200));
        assert_ne!(a, text(5, 1, 200));
        assert_ne!(a, text(6, 0, 200));
        let books: Vec<&String> = a.iter().filter(|d| d.contains("\n\n")).collect();
        let needles: Vec<&String> = a.iter().filter(|d| d.starts_with(NIAH_HEADER)).collect();
        assert!(
            books.len() > 40 && needles.len() > 30,
            "{} {}",
            books.len(),
            needles.len()
        );
        assert!(a.iter().any(|d| d.contains(" counts ")));
        for book in books {
            let (entries, tail) = book.split_once("\n\n").expect("book");
            for line in entries
                .lines()
                .chain(tail.lines().filter(|l| !l.is_empty()))
            {
                let (name, number) = line.split_once(": ").expect("entry");
                assert_eq!(name.split(' ').count(), 2, "{line}");
                assert!(number.len() == 10 && number.starts_with(['6', '7', '8', '9']));
                assert!(
                    entries.lines().any(|e| e == line),
                    "look-ups come from the book"
                );
            }
        }
        for doc in needles {
            let (question, answer) = doc.rsplit_once(" are ").expect("question");
            let value = answer.trim_end().trim_end_matches('.');
            assert_eq!(value.len(), 7);
            let key = question.rsplit_once(" for ").expect("key").1;
            let key = key.split(' ').next().expect("key");
            assert!(doc.contains(&format!("for {key} is: {value}.")), "{doc}");
        }
    }

    /// A needle document with its haystack is the eval's prompt followed by the answer.
    #[test]
    fn needle_documents_match_the_eval_prompt_layout() {
        let doc = text(9, 0, 300)
            .into_iter()
            .find(|d| d.starts_with(NIAH_HEADER) && d.matches("is: ").count() == 1)
            .expect("a single-needle document");
        let value = doc.split("is: ").nth(1).expect("needle")[..7].to_string();
        let key = doc
            .split("numbers for ")
            .nth(1)
            .and_then(|k| k.split(' ').next())
            .expect("key");
        let prompt = &doc[..doc.len() - format!(" {value}.\n").len()];
        let context = doc.lines().nth(1).expect("haystack");
        let n = context.matches('.').count() - 1;
        let eval = (0..=n).any(|at| {
            let depth = if n == 0 { 0.0 } else { at as f64 / n as f64 };
            niah::render(key, &value, n, depth).0 == prompt
        });
        assert!(eval, "{prompt}");
    }

    #[test]
    fn entropy_is_recorded_and_the_corpus_is_cached() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = ensure_corpus_of(CorpusKind::Text, root.path(), 3, 50_000).expect("generate");
        assert_eq!(dir, root.path().join("synthetic-text-3-50000"));
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).expect("read"))
                .expect("json");
        assert_eq!(manifest["generator"], GENERATOR);
        assert_eq!(manifest["vocab_size"], VOCAB_SIZE);
        let h = manifest["entropy_nats_per_token"]
            .as_f64()
            .expect("entropy");
        assert!(h > 0.2 && h < 2.0, "{h}");
        // The id corpus of the same seed is a different directory.
        assert!(ensure_corpus_of(CorpusKind::Ids, root.path(), 3, 50_000).is_ok());
    }
}
