//! ArchScale `train_name` flags: plain substring tests (hp-spec §3), decoded one way for
//! import and checked the other way so a kept name never lies about the run.

/// The substrings of a `train_name` that change behaviour at ArchScale 1a2e505.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameFlags {
    /// `mup`: μP++ (or μP with `_ori_mup`). Matches anywhere.
    pub mup: bool,
    /// `_ori_mup`: width-only μP.
    pub ori_mup: bool,
    /// `_rbase_` (both underscores): RoPE base 640000.
    pub rbase: bool,
    /// `_varlen`: document-separated attention and state.
    pub varlen: bool,
    /// `_ls_` (trailing underscore): label smoothing 0.1.
    pub ls: bool,
    /// `_tie` (also inside `_tied`): tied embeddings.
    pub tie: bool,
    /// `muon`: Muon for weights when `mup` is also set; otherwise only the strategy changes.
    pub muon: bool,
    /// `hadam`: NAdam for weights, only with `mup`.
    pub hadam: bool,
    /// `wsd`: warmup-stable-decay.
    pub wsd: bool,
    /// `cosine`: cosine decay.
    pub cosine: bool,
    /// `validation`: validate once and stop.
    pub validation: bool,
}

pub const RBASE_ROPE_BASE: f64 = 640_000.0;
pub const LABEL_SMOOTHING: f64 = 0.1;

pub fn decode(name: &str) -> NameFlags {
    NameFlags {
        mup: name.contains("mup"),
        ori_mup: name.contains("_ori_mup"),
        rbase: name.contains("_rbase_"),
        varlen: name.contains("_varlen"),
        ls: name.contains("_ls_"),
        tie: name.contains("_tie"),
        muon: name.contains("muon"),
        hadam: name.contains("hadam"),
        wsd: name.contains("wsd"),
        cosine: name.contains("cosine"),
        validation: name.contains("validation"),
    }
}

/// The optimizer ArchScale builds for these flags: hybrids only under μP (hadam checked first).
pub fn optimizer_of(f: &NameFlags) -> &'static str {
    if f.mup && f.hadam {
        "nadam"
    } else if f.mup && f.muon {
        "muon"
    } else {
        "adamw"
    }
}

pub fn parametrization_of(f: &NameFlags) -> &'static str {
    if f.ori_mup {
        "mup"
    } else if f.mup {
        "mup++"
    } else {
        "sp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substring_pitfalls() {
        assert!(!decode("scaling_mup_rbase").rbase);
        assert!(decode("scaling_mup_rbase_varlen").rbase);
        assert!(decode("scaling_mup_rbase_varlen").varlen);
        let ori = decode("scaling_ori_mup");
        assert!(ori.mup && ori.ori_mup);
        assert_eq!(parametrization_of(&ori), "mup");
        assert!(decode("x_tied").tie);
        assert!(!decode("scaling_ls").ls);
        assert_eq!(optimizer_of(&decode("scaling_muon")), "adamw");
        assert_eq!(optimizer_of(&decode("scaling_mup_muon")), "muon");
        assert_eq!(optimizer_of(&decode("scaling_mup_hadam")), "nadam");
        assert_eq!(parametrization_of(&decode("scaling")), "sp");
    }
}
