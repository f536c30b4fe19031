//! Document boundaries for variable-length (`varlen`) training (arch-spec §4.3).

/// For each row of `seq` input tokens, `seg_start[b·seq + t]` = first position of the document
/// containing `t`: one past the last `eos` strictly before `t`, else 0. A document ends *with*
/// its EOS (ArchScale's `cu_seqlens = [0] ++ (EOS positions + 1) ++ [T]`). Attention and the
/// Mamba conv/scan never look before `seg_start`.
pub fn segment_starts(tokens: &[u32], seq: usize, eos: u32, seg_start: &mut [u32]) {
    assert_eq!(tokens.len(), seg_start.len());
    for (row, out) in tokens.chunks(seq).zip(seg_start.chunks_mut(seq)) {
        let mut start = 0u32;
        for (t, (&tok, s)) in row.iter().zip(out.iter_mut()).enumerate() {
            *s = start;
            if tok == eos {
                start = t as u32 + 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_follow_eos() {
        let toks = [
            5, 2, 7, 7, 2, 2, 9, 9, /* row 2 */ 2, 3, 3, 3, 3, 3, 3, 2,
        ];
        let mut s = [0u32; 16];
        super::segment_starts(&toks, 8, 2, &mut s);
        assert_eq!(s, [0, 0, 2, 2, 2, 5, 6, 6, 0, 1, 1, 1, 1, 1, 1, 1]);
    }
}
