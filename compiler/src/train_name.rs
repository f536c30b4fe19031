//! ArchScale's `train_name`: a flag string tested by substring (hp-spec §3).
//!
//! `decode` reads a name exactly as pretrain.py@1a2e505 does; `derive` writes a name from
//! our settings that decodes back to the same flags, so every run directory is named the
//! way ArchScale would name the same run.

use crate::plan::{DecayShape, Parametrization};

/// The flags ArchScale reads from `train_name` (plain, case-sensitive substring tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrainNameFlags {
    /// `mup` anywhere (so `_ori_mup` sets it too).
    pub mup: bool,
    /// `_ori_mup`: width-only μP.
    pub original_mup: bool,
    /// `_rbase_` (both underscores): RoPE base 640000.
    pub rbase: bool,
    /// `_varlen`: document-separated attention and SSM state.
    pub varlen: bool,
    /// `_ls_`: label smoothing 0.1.
    pub label_smoothing: bool,
    /// `_tie` (also matches inside `_tied`).
    pub tie: bool,
    /// `muon`: FSDP2 strategy; with `mup` also AdamW + Muon.
    pub muon: bool,
    /// `hadam`: with `mup`, AdamW + NAdam.
    pub hadam: bool,
    pub wsd: bool,
    pub cosine: bool,
    /// `validation`: ArchScale runs one validation pass and stops.
    pub validation: bool,
}

/// ArchScale's RoPE base with `_rbase_`.
pub const RBASE_ROPE_BASE: f64 = 640_000.0;
/// ArchScale's RoPE base otherwise.
pub const DEFAULT_ROPE_BASE: f64 = 10_000.0;
/// ArchScale's label smoothing with `_ls_`.
pub const LS_LABEL_SMOOTHING: f64 = 0.1;

/// The optimizer ArchScale builds (hp-spec §8.2): `hadam` and `muon` only act under μP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EffectiveOptimizer {
    AdamW,
    AdamWNAdam,
    AdamWMuon,
}

impl TrainNameFlags {
    pub fn decode(name: &str) -> Self {
        Self {
            mup: name.contains("mup"),
            original_mup: name.contains("_ori_mup"),
            rbase: name.contains("_rbase_"),
            varlen: name.contains("_varlen"),
            label_smoothing: name.contains("_ls_"),
            tie: name.contains("_tie"),
            muon: name.contains("muon"),
            hadam: name.contains("hadam"),
            wsd: name.contains("wsd"),
            cosine: name.contains("cosine"),
            validation: name.contains("validation"),
        }
    }

    pub fn parametrization(&self) -> Parametrization {
        match (self.mup, self.original_mup) {
            (false, _) => Parametrization::Sp,
            (true, true) => Parametrization::Mup,
            (true, false) => Parametrization::MupPlusPlus,
        }
    }

    /// pretrain.py:409-423 tests `hadam` before `muon`, both only under `mup`.
    pub fn optimizer(&self) -> EffectiveOptimizer {
        if self.mup && self.hadam {
            EffectiveOptimizer::AdamWNAdam
        } else if self.mup && self.muon {
            EffectiveOptimizer::AdamWMuon
        } else {
            EffectiveOptimizer::AdamW
        }
    }

    pub fn decay(&self) -> DecayShape {
        if self.cosine {
            DecayShape::Cosine
        } else {
            DecayShape::Linear
        }
    }
}

/// Settings a derived name has to encode.
#[derive(Clone, Copy, Debug)]
pub struct NameSettings {
    pub parametrization: Parametrization,
    /// The run ties embeddings and the family does not already.
    pub tie: bool,
    /// RoPE base override, if any.
    pub rope_base: Option<f64>,
    pub label_smoothing: f64,
    pub varlen: bool,
    pub optimizer: EffectiveOptimizer,
    pub decay: DecayShape,
    pub wsd: bool,
    /// The model is ArchScale-parallelised with FSDP2 (`muon` in the name without μP).
    pub fsdp2: bool,
}

/// Builds `scaling[_mup|_ori_mup][_tie][_rbase_][_ls_][_varlen][_hadam|_muon][_wsd][_cosine]`,
/// sharing underscores the way ArchScale's own names do (`scaling_mup_rbase_varlen`); a
/// trailing `_rbase` or `_ls` keeps its closing underscore.
///
/// Settings ArchScale cannot express are appended as `_rope<base>` and `_ls<value>`; these
/// contain none of ArchScale's flag substrings, so ArchScale would decode such a name as
/// the nearest run it can do (base 10000, no smoothing). This is deliberate and visible.
pub fn derive(s: &NameSettings) -> String {
    let mut tokens: Vec<String> = vec!["scaling".into()];
    match s.parametrization {
        Parametrization::Sp => {}
        Parametrization::Mup => tokens.push("ori_mup".into()),
        Parametrization::MupPlusPlus => tokens.push("mup".into()),
    }
    if s.tie {
        tokens.push("tie".into());
    }
    let mut extensions = Vec::new();
    match s.rope_base {
        Some(b) if b == RBASE_ROPE_BASE => tokens.push("rbase".into()),
        Some(b) if b != DEFAULT_ROPE_BASE => extensions.push(format!("rope{}", fmt_plain(b))),
        _ => {}
    }
    if s.label_smoothing == LS_LABEL_SMOOTHING {
        tokens.push("ls".into());
    } else if s.label_smoothing != 0.0 {
        extensions.push(format!("ls{}", fmt_plain(s.label_smoothing)));
    }
    if s.varlen {
        tokens.push("varlen".into());
    }
    match s.optimizer {
        EffectiveOptimizer::AdamW if s.fsdp2 => tokens.push("muon".into()),
        EffectiveOptimizer::AdamW => {}
        EffectiveOptimizer::AdamWNAdam => tokens.push("hadam".into()),
        EffectiveOptimizer::AdamWMuon => tokens.push("muon".into()),
    }
    if s.wsd {
        tokens.push("wsd".into());
    }
    if s.decay == DecayShape::Cosine {
        tokens.push("cosine".into());
    }
    tokens.extend(extensions);
    let mut name = tokens.join("_");
    if matches!(tokens.last().map(String::as_str), Some("rbase" | "ls")) {
        name.push('_');
    }
    name
}

/// `640000`, `0.2`: integers without a fraction, others as Rust prints them.
fn fmt_plain(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substring_pitfalls() {
        let f = TrainNameFlags::decode("scaling_mup_rbase");
        assert!(f.mup && !f.rbase);
        assert!(TrainNameFlags::decode("scaling_mup_rbase_").rbase);
        let f = TrainNameFlags::decode("scaling_ori_mup");
        assert_eq!(f.parametrization(), Parametrization::Mup);
        assert!(TrainNameFlags::decode("x_tied").tie);
        assert_eq!(
            TrainNameFlags::decode("scaling_muon").optimizer(),
            EffectiveOptimizer::AdamW
        );
        assert_eq!(
            TrainNameFlags::decode("scaling_mup_muon").optimizer(),
            EffectiveOptimizer::AdamWMuon
        );
        assert_eq!(
            TrainNameFlags::decode("scaling_mup_hadam").optimizer(),
            EffectiveOptimizer::AdamWNAdam
        );
        assert!(!TrainNameFlags::decode("scaling_mup_ls").label_smoothing);
        // The default name of setup().
        let f = TrainNameFlags::decode("scaling_mup_tie_rbase_prolong_varlen");
        assert!(f.mup && f.tie && f.rbase && f.varlen && !f.original_mup);
    }

    #[test]
    fn derived_names_decode_to_their_settings() {
        let params = [
            Parametrization::Sp,
            Parametrization::Mup,
            Parametrization::MupPlusPlus,
        ];
        let opts = [
            EffectiveOptimizer::AdamW,
            EffectiveOptimizer::AdamWNAdam,
            EffectiveOptimizer::AdamWMuon,
        ];
        for p in params {
            for o in opts {
                if p == Parametrization::Sp && o != EffectiveOptimizer::AdamW {
                    continue;
                }
                for bits in 0..64u32 {
                    let s = NameSettings {
                        parametrization: p,
                        tie: bits & 1 != 0,
                        rope_base: if bits & 2 != 0 {
                            Some(RBASE_ROPE_BASE)
                        } else {
                            None
                        },
                        label_smoothing: if bits & 4 != 0 { 0.1 } else { 0.0 },
                        varlen: bits & 8 != 0,
                        optimizer: o,
                        decay: if bits & 16 != 0 {
                            DecayShape::Cosine
                        } else {
                            DecayShape::Linear
                        },
                        wsd: bits & 32 != 0,
                        fsdp2: false,
                    };
                    let name = derive(&s);
                    let f = TrainNameFlags::decode(&name);
                    assert_eq!(f.parametrization(), p, "{name}");
                    assert_eq!(f.optimizer(), o, "{name}");
                    assert_eq!(f.tie, s.tie, "{name}");
                    assert_eq!(f.rbase, s.rope_base.is_some(), "{name}");
                    assert_eq!(f.label_smoothing, s.label_smoothing != 0.0, "{name}");
                    assert_eq!(f.varlen, s.varlen, "{name}");
                    assert_eq!(f.decay(), s.decay, "{name}");
                    assert_eq!(f.wsd, s.wsd, "{name}");
                    assert!(!f.validation, "{name}");
                    assert_eq!(f.muon, o == EffectiveOptimizer::AdamWMuon, "{name}");
                }
            }
        }
        assert_eq!(
            derive(&NameSettings {
                parametrization: Parametrization::MupPlusPlus,
                tie: true,
                rope_base: Some(RBASE_ROPE_BASE),
                label_smoothing: 0.0,
                varlen: true,
                optimizer: EffectiveOptimizer::AdamW,
                decay: DecayShape::Linear,
                wsd: false,
                fsdp2: false,
            }),
            "scaling_mup_tie_rbase_varlen"
        );
    }
}
