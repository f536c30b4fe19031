//! Format, corruption, sampling-order and resume tests for the data pipeline.

use super::loader::{rank_files, TrainLoader, ValLoader};
use super::packed::{Dtype, FinalChunk, Header, PackedFile, PackedWriter, HEADER_SIZE};
use crate::RuntimeError;
use archscale_compiler::{DataPlan, DataSource};
use std::path::{Path, PathBuf};

/// `n_files` u16 shards of `chunk` tokens under `dir/prefix`; token at position i of file
/// f is `base + f * chunk + i`, so every token names its file and position.
fn write_numbered(
    dir: &Path,
    prefix: &str,
    n_files: usize,
    chunk: usize,
    base: u32,
) -> Vec<PathBuf> {
    let mut writer = PackedWriter::new(dir, prefix, chunk, Dtype::U16, 1).expect("writer");
    let tokens: Vec<u32> = (0..(n_files * chunk) as u32).map(|t| base + t).collect();
    writer.add_document(&tokens).expect("add");
    let summary = writer.finish(FinalChunk::Pad).expect("finish");
    assert_eq!(summary.files.len(), n_files);
    summary.files
}

fn data_plan(train: Vec<DataSource>, block_size: usize, n_chunks: usize) -> DataPlan {
    DataPlan {
        train,
        val: Vec::new(),
        block_size,
        val_block_size: block_size,
        val_micro_batch: 1,
        n_chunks,
        seed: 3407,
    }
}

fn packed(dir: &str, prefix: &str, weight: f64) -> DataSource {
    DataSource::Packed {
        dir: dir.into(),
        prefix: prefix.into(),
        weight,
    }
}

fn rows(batch: &[u32], block: usize) -> Vec<&[u32]> {
    batch.chunks(block).collect()
}

// ---------------------------------------------------------------------------------------
// Format

#[test]
fn writer_matches_litgpt_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut writer = PackedWriter::new(dir.path(), "train", 4, Dtype::U16, 1).expect("writer");
    writer.add_document(&[10, 11, 12]).expect("add");
    writer.add_document(&[20, 21, 22]).expect("add"); // overflows into the second file
    let summary = writer.finish(FinalChunk::Pad).expect("finish");
    let names: Vec<_> = summary
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["train_0000000000.bin", "train_0000000001.bin"]);
    assert_eq!(
        (summary.tokens, summary.documents, summary.padding_tokens),
        (6, 2, 2)
    );
    let bytes = std::fs::read(&summary.files[0]).expect("read");
    let mut expected = b"LITPKDS".to_vec();
    expected.extend(1u64.to_le_bytes());
    expected.push(8); // u16
    expected.extend(4u64.to_le_bytes());
    for t in [10u16, 11, 12, 20] {
        expected.extend(t.to_le_bytes());
    }
    assert_eq!(bytes, expected);
    let second = PackedFile::open(&summary.files[1]).expect("open");
    assert_eq!(second.tokens().expect("tokens"), vec![21, 22, 1, 1]);
}

#[test]
fn round_trip_every_integer_dtype() {
    for dtype in [
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::I32,
        Dtype::I64,
        Dtype::U16,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut writer = PackedWriter::new(dir.path(), "x", 7, dtype, 0).expect("writer");
        let docs: Vec<Vec<u32>> = (0..5)
            .map(|d| (0..d + 2).map(|t| (d * 10 + t) as u32).collect())
            .collect();
        for doc in &docs {
            writer.add_document(doc).expect("add");
        }
        let summary = writer.finish(FinalChunk::Pad).expect("finish");
        let mut all = Vec::new();
        for path in &summary.files {
            let file = PackedFile::open(path).expect("open");
            assert_eq!((file.dtype(), file.len()), (dtype, 7));
            all.extend(file.tokens().expect("tokens"));
        }
        let flat: Vec<u32> = docs.concat();
        assert_eq!(all[..flat.len()], flat[..], "{dtype:?}");
        assert!(all[flat.len()..].iter().all(|&t| t == 0));
    }
}

#[test]
fn final_chunk_drop_is_archscale_and_pad_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut writer = PackedWriter::new(dir.path(), "d", 4, Dtype::U16, 1).expect("writer");
    writer.add_document(&[5, 6, 7, 8, 9]).expect("add");
    let summary = writer.finish(FinalChunk::Drop).expect("finish");
    assert_eq!((summary.files.len(), summary.dropped_tokens), (1, 1));
    // A full buffer is never dropped.
    let mut writer = PackedWriter::new(dir.path(), "e", 4, Dtype::U16, 1).expect("writer");
    writer.add_document(&[5, 6, 7, 8]).expect("add");
    assert_eq!(
        writer.finish(FinalChunk::Drop).expect("finish").files.len(),
        1
    );
}

#[test]
fn writer_rejects_ids_that_do_not_fit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut writer = PackedWriter::new(dir.path(), "x", 8, Dtype::U16, 1).expect("writer");
    assert!(writer.add_document(&[70_000]).is_err());
    assert!(PackedWriter::new(dir.path(), "x", 8, Dtype::F32, 1).is_err());
}

// ---------------------------------------------------------------------------------------
// Corruption: each case is an error naming the file and the byte offset, never a panic.

fn corrupt_case(mutate: impl FnOnce(&mut Vec<u8>)) -> (PathBuf, RuntimeError) {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let path = write_numbered(&dir, "c", 1, 16, 3).remove(0);
    let mut bytes = std::fs::read(&path).expect("read");
    mutate(&mut bytes);
    std::fs::write(&path, &bytes).expect("write");
    let err = PackedFile::open(&path).expect_err("must fail");
    let header_err = PackedFile::read_header(&path).expect_err("header must fail");
    assert_eq!(err.to_string(), header_err.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    (path, err)
}

fn expect_corrupt(case: (PathBuf, RuntimeError), want_offset: u64, want_reason: &str) {
    let (path, err) = case;
    match &err {
        RuntimeError::CorruptShard {
            path: p,
            offset,
            reason,
        } => {
            assert_eq!(p, &path);
            assert_eq!(*offset, want_offset, "{err}");
            assert!(reason.contains(want_reason), "{err}");
        }
        other => panic!("expected CorruptShard, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()) && text.contains(&format!("byte {want_offset}")),
        "{text}"
    );
}

#[test]
fn bad_magic() {
    expect_corrupt(
        corrupt_case(|b| b[0..7].copy_from_slice(b"NOTPKDS")),
        0,
        "bad magic",
    );
}

#[test]
fn unknown_version() {
    expect_corrupt(
        corrupt_case(|b| b[7..15].copy_from_slice(&2u64.to_le_bytes())),
        7,
        "version 2",
    );
}

#[test]
fn unknown_dtype() {
    expect_corrupt(corrupt_case(|b| b[15] = 9), 15, "dtype code 9");
    expect_corrupt(corrupt_case(|b| b[15] = 0), 15, "dtype code 0");
}

#[test]
fn truncated_body() {
    expect_corrupt(
        corrupt_case(|b| b.truncate(HEADER_SIZE + 10)),
        (HEADER_SIZE + 10) as u64,
        "truncated",
    );
}

#[test]
fn trailing_bytes() {
    expect_corrupt(
        corrupt_case(|b| b.extend([0, 0])),
        (HEADER_SIZE + 32) as u64,
        "trailing",
    );
}

#[test]
fn shorter_than_header() {
    expect_corrupt(corrupt_case(|b| b.truncate(10)), 10, "shorter than");
    expect_corrupt(corrupt_case(|b| b.clear()), 0, "shorter than");
}

#[test]
fn absurd_chunk_size() {
    expect_corrupt(
        corrupt_case(|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())),
        16,
        "overflows",
    );
}

#[test]
fn negative_token_is_an_error_with_its_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("neg.bin");
    let mut bytes = Header {
        dtype: Dtype::I32,
        chunk_size: 3,
    }
    .to_bytes()
    .to_vec();
    for t in [5i32, -1, 6] {
        bytes.extend(t.to_le_bytes());
    }
    std::fs::write(&path, bytes).expect("write");
    let file = PackedFile::open(&path).expect("header is fine");
    match file.tokens().expect_err("negative id") {
        RuntimeError::CorruptShard { offset, .. } => assert_eq!(offset, (HEADER_SIZE + 4) as u64),
        other => panic!("{other}"),
    }
}

#[test]
fn loader_reports_corrupt_shards_before_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_numbered(dir.path(), "train", 3, 20, 3);
    let mut bytes = std::fs::read(&files[1]).expect("read");
    bytes.truncate(30);
    std::fs::write(&files[1], bytes).expect("write");
    let plan = data_plan(vec![packed(".", "train", 1.0)], 5, 8);
    let err = TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path())
        .err()
        .expect("corrupt");
    assert!(matches!(err, RuntimeError::CorruptShard { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------
// Sampling order

#[test]
fn file_order_is_pythons_shuffle_and_ranks_partition_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "train", 10, 4, 3);
    // `random.seed(3407); random.shuffle(sorted(names))` in CPython.
    let python_order = [9, 5, 4, 8, 3, 1, 7, 2, 6, 0];
    let index = |p: &PathBuf| {
        p.file_name().unwrap().to_string_lossy()[6..16]
            .parse::<usize>()
            .unwrap()
    };
    let all: Vec<usize> = rank_files(dir.path(), "train", 3407, 0, 1)
        .expect("files")
        .iter()
        .map(index)
        .collect();
    assert_eq!(all, python_order);
    // World 3: files[r : 9 : 3]; the 10th file is unused.
    let mut seen = Vec::new();
    for rank in 0..3 {
        let mine: Vec<usize> = rank_files(dir.path(), "train", 3407, rank, 3)
            .expect("files")
            .iter()
            .map(index)
            .collect();
        let expected: Vec<usize> = python_order[..9]
            .iter()
            .skip(rank)
            .step_by(3)
            .copied()
            .collect();
        assert_eq!(mine, expected);
        seen.extend(mine);
    }
    seen.sort();
    let mut first9 = python_order[..9].to_vec();
    first9.sort();
    assert_eq!(seen, first9);
    // More ranks than files: an error naming the counts.
    let err = rank_files(dir.path(), "train", 3407, 0, 11).expect_err("too many ranks");
    let text = err.to_string();
    assert!(
        text.contains("10 shard(s)") && text.contains("world of 11"),
        "{text}"
    );
    // No files at all.
    assert!(rank_files(dir.path(), "validation", 3407, 0, 1).is_err());
}

/// The full ArchScale order on a small setup: 4 files x 5 blocks, n_chunks 4, seed 3407.
/// Expected values from CPython's `random.shuffle` and NumPy's
/// `np.random.default_rng(3407).permutation(20)` (twice: the generator continues).
#[test]
fn block_order_matches_archscale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let block = 3;
    let chunk = 16; // 5 blocks of 3, one token unused
    write_numbered(dir.path(), "train", 4, chunk, 3);
    let plan = data_plan(vec![packed(".", "train", 1.0)], block, 4);
    let mut loader = TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).expect("loader");
    let file_order = [2u32, 3, 1, 0];
    let perm1 = [
        4, 13, 5, 0, 17, 14, 7, 16, 2, 9, 19, 18, 12, 15, 6, 3, 11, 8, 1, 10,
    ];
    let perm2 = [
        10, 16, 1, 17, 9, 6, 14, 15, 4, 7, 8, 11, 5, 0, 2, 12, 3, 18, 13, 19,
    ];
    let batch = loader.next_batch(40).expect("batch");
    for (row, &b) in rows(&batch, block).iter().zip(perm1.iter().chain(&perm2)) {
        let file = file_order[b / 5];
        let start = 3 + file * chunk as u32 + (b % 5) as u32 * block as u32;
        assert_eq!(row, &[start, start + 1, start + 2]);
    }
}

#[test]
fn wraps_with_drop_last_and_clamps_n_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "train", 5, 8, 3);
    let file_of = |t: u32| (t - 3) / 8;
    // n_chunks 2 of 5 files: groups [0,1], [2,3], then wrap to [0,1]; the 5th file is skipped.
    let plan = data_plan(vec![packed(".", "train", 1.0)], 4, 2);
    let mut loader = TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).expect("loader");
    let order: Vec<PathBuf> = rank_files(dir.path(), "train", 3407, 0, 1).expect("files");
    let file_index = |p: &PathBuf| {
        p.file_name().unwrap().to_string_lossy()[6..16]
            .parse::<u32>()
            .unwrap()
    };
    let group = |g: &[usize]| -> Vec<u32> {
        let mut v: Vec<u32> = g.iter().map(|&i| file_index(&order[i])).collect();
        v.sort();
        v
    };
    for (pass, expected) in [group(&[0, 1]), group(&[2, 3]), group(&[0, 1])]
        .into_iter()
        .enumerate()
    {
        let batch = loader.next_batch(4).expect("batch");
        let mut files: Vec<u32> = rows(&batch, 4).iter().map(|r| file_of(r[0])).collect();
        files.sort();
        files.dedup();
        assert_eq!(files, expected, "group {pass}");
    }
    // More chunks than files: all files at once, every block once per pass.
    let plan = data_plan(vec![packed(".", "train", 1.0)], 4, 64);
    let mut loader = TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).expect("loader");
    for _ in 0..2 {
        let batch = loader.next_batch(10).expect("batch");
        let mut firsts: Vec<u32> = rows(&batch, 4).iter().map(|r| r[0]).collect();
        firsts.sort();
        assert_eq!(firsts, (0..10).map(|b| 3 + b * 4).collect::<Vec<_>>());
    }
}

#[test]
fn loaders_are_deterministic_and_ranks_differ() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "train", 6, 50, 3);
    let plan = data_plan(vec![packed(".", "train", 1.0)], 7, 2);
    let take = |rank| {
        let mut l = TrainLoader::from_data_plan(&plan, None, rank, 2, dir.path()).expect("loader");
        (0..10)
            .map(|_| l.next_batch(3).expect("batch"))
            .collect::<Vec<_>>()
    };
    assert_eq!(take(0), take(0));
    let (a, b) = (take(0), take(1));
    let files = |batches: &[Vec<u32>]| -> std::collections::BTreeSet<u32> {
        batches
            .iter()
            .flat_map(|b| b.chunks(7).map(|r| (r[0] - 3) / 50))
            .collect()
    };
    assert!(
        files(&a).is_disjoint(&files(&b)),
        "ranks must read disjoint files"
    );
}

#[test]
fn resume_reproduces_the_uninterrupted_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "a", 5, 40, 3);
    write_numbered(dir.path(), "b", 3, 40, 1000);
    let plan = data_plan(vec![packed(".", "a", 1.0), packed(".", "b", 2.0)], 6, 2);
    let mut reference = TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).expect("loader");
    let mut states = Vec::new();
    let mut batches = Vec::new();
    for _ in 0..60 {
        states.push(reference.state());
        batches.push(reference.next_batch(2).expect("batch"));
    }
    // Resume from every point, including mid-group and group boundaries, via JSON.
    for start in [0, 1, 5, 13, 29, 59] {
        let json = serde_json::to_string(&states[start]).expect("serialize");
        let state = serde_json::from_str(&json).expect("deserialize");
        let mut resumed =
            TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).expect("loader");
        resumed.restore(&state).expect("restore");
        assert_eq!(resumed.rows_served(), 2 * start as u64);
        for (i, expected) in batches.iter().enumerate().skip(start) {
            assert_eq!(
                &resumed.next_batch(2).expect("batch"),
                expected,
                "resumed at {start}, batch {i}"
            );
        }
    }
    // A state from another layout is refused.
    let other = data_plan(vec![packed(".", "a", 1.0)], 6, 2);
    let mut wrong = TrainLoader::from_data_plan(&other, None, 0, 1, dir.path()).expect("loader");
    assert!(wrong.restore(&states[3]).is_err());
}

#[test]
fn skipping_rows_lands_where_reading_them_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "a", 5, 40, 3);
    write_numbered(dir.path(), "b", 3, 40, 1000);
    let plan = data_plan(vec![packed(".", "a", 1.0), packed(".", "b", 2.0)], 6, 2);
    // across group boundaries and past the wrap of both sources
    for rows in [0u64, 1, 7, 40, 333] {
        let mut read = TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).expect("loader");
        let mut skipped =
            TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).expect("loader");
        for _ in 0..rows {
            read.next_batch(1).expect("batch");
        }
        skipped.skip_rows(rows).expect("skip");
        assert_eq!(skipped.state(), read.state(), "after {rows} rows");
        assert_eq!(
            skipped.next_batch(3).expect("batch"),
            read.next_batch(3).expect("batch"),
            "after {rows} rows"
        );
    }
}

#[test]
fn mixture_follows_the_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "a", 2, 400, 3);
    write_numbered(dir.path(), "b", 2, 400, 2000);
    let plan = data_plan(vec![packed(".", "a", 1.0), packed(".", "b", 3.0)], 4, 8);
    let mut loader = TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).expect("loader");
    let batch = loader.next_batch(4000).expect("batch");
    let from_b: Vec<bool> = batch.chunks(4).map(|r| r[0] >= 2000).collect();
    // `random.Random(3407).choices([a, b], weights=[0.25, 0.75])` in CPython.
    assert_eq!(
        from_b[..10],
        [false, false, false, true, true, false, true, true, true, true]
    );
    let share = from_b.iter().filter(|&&b| b).count() as f64 / from_b.len() as f64;
    assert!((share - 0.75).abs() < 0.03, "share of b {share}");
}

#[test]
fn bad_weights_and_empty_plans_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "a", 1, 40, 3);
    for weights in [vec![0.0], vec![-1.0], vec![f64::NAN]] {
        let plan = data_plan(
            weights.into_iter().map(|w| packed(".", "a", w)).collect(),
            4,
            1,
        );
        assert!(TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).is_err());
    }
    assert!(TrainLoader::from_data_plan(&data_plan(vec![], 4, 1), None, 0, 1, dir.path()).is_err());
    // A block longer than a file.
    let plan = data_plan(vec![packed(".", "a", 1.0)], 41, 1);
    assert!(TrainLoader::from_data_plan(&plan, None, 0, 1, dir.path()).is_err());
}

#[test]
fn tokens_outside_the_vocabulary_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "a", 1, 40, 3);
    let plan = data_plan(vec![packed(".", "a", 1.0)], 40, 1);
    let mut loader =
        TrainLoader::from_data_plan(&plan, Some(30), 0, 1, dir.path()).expect("loader");
    let err = loader
        .next_batch(1)
        .expect_err("id 30+ is outside a vocabulary of 30");
    match err {
        RuntimeError::CorruptShard { offset, .. } => {
            assert_eq!(offset, (HEADER_SIZE + 2 * 27) as u64)
        }
        other => panic!("{other}"),
    }
}

#[test]
fn validation_is_sequential_and_identical_every_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_numbered(dir.path(), "validation", 3, 20, 3);
    let mut plan = data_plan(vec![packed(".", "validation", 1.0)], 5, 8);
    plan.val = plan.train.clone();
    plan.val_block_size = 9;
    let val = ValLoader::from_data_plan(&plan, None, 8, 0, 1, dir.path()).expect("val");
    let first = val.batches(100, 2).expect("batches");
    assert_eq!(first, val.batches(100, 2).expect("batches"));
    let again = ValLoader::from_data_plan(&plan, None, 8, 0, 1, dir.path()).expect("val");
    assert_eq!(first, again.batches(100, 2).expect("batches"));
    // 3 files x 2 blocks of 9 = 6 rows = 3 batches of 2, in file order, blocks in order.
    assert_eq!(first.len(), 3);
    let order = rank_files(dir.path(), "validation", 3407, 0, 1).expect("files");
    let file_index = |p: &PathBuf| {
        p.file_name().unwrap().to_string_lossy()[11..21]
            .parse::<u32>()
            .unwrap()
    };
    let expected: Vec<u32> = order
        .iter()
        .flat_map(|p| [0u32, 9].map(|o| 3 + file_index(p) * 20 + o))
        .collect();
    let got: Vec<u32> = first
        .iter()
        .flat_map(|b| b.chunks(9).map(|r| r[0]))
        .collect();
    assert_eq!(got, expected);
    // Too little data for one batch is an error; no sources is no batches.
    assert!(val.batches(1, 7).is_err());
    plan.val.clear();
    let none = ValLoader::from_data_plan(&plan, None, 8, 0, 1, dir.path()).expect("val");
    assert!(none.is_empty() && none.batches(3, 2).expect("empty").is_empty());
}

#[test]
fn synthetic_sources_generate_and_load() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = DataSource::Synthetic {
        seed: 11,
        tokens: 200_000,
        weight: 1.0,
    };
    let mut plan = data_plan(vec![source.clone()], 65, 8);
    plan.val = vec![source];
    plan.val_block_size = 129;
    let mut train =
        TrainLoader::from_data_plan(&plan, Some(512), 0, 1, root.path()).expect("train");
    let batch = train.next_batch(4).expect("batch");
    assert_eq!(batch.len(), 4 * 65);
    assert!(batch.iter().all(|&t| t < 512));
    let val = ValLoader::from_data_plan(&plan, Some(512), 8, 0, 1, root.path()).expect("val");
    let val_batches = val.batches(2, 3).expect("val batches");
    assert_eq!(val_batches.len(), 2);
    assert!(root
        .path()
        .join(crate::data::loader::SYNTHETIC_CACHE_DIR)
        .join("synthetic-11-200000")
        .join("synthetic.json")
        .exists());
    // Validation rows come from the validation stream, not the training one.
    let train_rows: std::collections::HashSet<&[u32]> = batch.chunks(65).collect();
    assert!(val_batches[0]
        .chunks(129)
        .all(|r| !train_rows.contains(&r[..65])));
}

/// Random header bytes and random truncations: always an error or valid tokens, never a panic.
#[test]
fn mutated_shards_never_panic() {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let dir = tempfile::tempdir().expect("tempdir");
    let original = std::fs::read(&write_numbered(dir.path(), "m", 1, 32, 3)[0]).expect("read");
    let path = dir.path().join("mutated.bin");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for case in 0..300 {
        let mut bytes = original.clone();
        match case % 3 {
            0 => {
                let i = rng.next_u32() as usize % HEADER_SIZE;
                bytes[i] = rng.next_u32() as u8;
            }
            1 => bytes.truncate(rng.next_u32() as usize % (original.len() + 1)),
            _ => {
                // A plausible header with random dtype and size.
                bytes[15] = (rng.next_u32() % 10) as u8;
                let size = rng.next_u64() % 80;
                bytes[16..24].copy_from_slice(&size.to_le_bytes());
            }
        }
        std::fs::write(&path, &bytes).expect("write");
        if let Ok(file) = PackedFile::open(&path) {
            let _ = file.tokens();
        }
    }
}
