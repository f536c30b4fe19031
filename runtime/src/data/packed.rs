//! LITPKDS packed token files, byte-compatible with ArchScale / litgpt `packed_dataset.py`.
//!
//! ```text
//! offset 0  : 7 bytes  "LITPKDS"
//! offset 7  : u64 LE   version = 1
//! offset 15 : u8       dtype code (1=u8 2=i8 3=i16 4=i32 5=i64 6=f32 7=f64 8=u16)
//! offset 16 : u64 LE   chunk_size (tokens in the file)
//! offset 24 : chunk_size tokens, little-endian
//! ```

use crate::{Result, RuntimeError};
use memmap2::Mmap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 7] = b"LITPKDS";
pub const VERSION: u64 = 1;
pub const HEADER_SIZE: usize = 24;
/// ArchScale's SlimPajama chunk: 1024 blocks of 2049 tokens.
pub const ARCHSCALE_CHUNK_SIZE: usize = 2049 * 1024;

/// Element type of a packed file (litgpt's dtype codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    U8,
    I8,
    I16,
    I32,
    I64,
    F32,
    F64,
    U16,
}

impl Dtype {
    pub fn from_code(code: u8) -> Option<Dtype> {
        Some(match code {
            1 => Dtype::U8,
            2 => Dtype::I8,
            3 => Dtype::I16,
            4 => Dtype::I32,
            5 => Dtype::I64,
            6 => Dtype::F32,
            7 => Dtype::F64,
            8 => Dtype::U16,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            Dtype::U8 => 1,
            Dtype::I8 => 2,
            Dtype::I16 => 3,
            Dtype::I32 => 4,
            Dtype::I64 => 5,
            Dtype::F32 => 6,
            Dtype::F64 => 7,
            Dtype::U16 => 8,
        }
    }

    pub fn itemsize(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::I32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// The dtype ArchScale's writer picks: u16 if the vocabulary is below 65500, else i32.
    pub fn for_vocab(vocab_size: usize) -> Dtype {
        if vocab_size < 65500 {
            Dtype::U16
        } else {
            Dtype::I32
        }
    }

    /// Largest token id the dtype can store (as a token, i.e. non-negative).
    fn max_token(self) -> u64 {
        match self {
            Dtype::U8 => u8::MAX as u64,
            Dtype::I8 => i8::MAX as u64,
            Dtype::I16 => i16::MAX as u64,
            Dtype::U16 => u16::MAX as u64,
            Dtype::I32 => i32::MAX as u64,
            Dtype::I64 | Dtype::F32 | Dtype::F64 => u32::MAX as u64,
        }
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::CorruptShard {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

fn io_error(context: String, source: std::io::Error) -> RuntimeError {
    RuntimeError::Io { context, source }
}

/// Parsed LITPKDS header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub dtype: Dtype,
    pub chunk_size: usize,
}

impl Header {
    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[0..7].copy_from_slice(MAGIC);
        bytes[7..15].copy_from_slice(&VERSION.to_le_bytes());
        bytes[15] = self.dtype.code();
        bytes[16..24].copy_from_slice(&(self.chunk_size as u64).to_le_bytes());
        bytes
    }

    /// Parses and checks a header against the file's total size.
    pub fn parse(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header> {
        if bytes.len() < HEADER_SIZE {
            return Err(corrupt(
                path,
                bytes.len() as u64,
                format!(
                    "file is {} bytes, shorter than the {HEADER_SIZE}-byte LITPKDS header",
                    bytes.len()
                ),
            ));
        }
        if &bytes[0..7] != MAGIC {
            return Err(corrupt(
                path,
                0,
                format!(
                    "bad magic {:?}, expected \"LITPKDS\"",
                    String::from_utf8_lossy(&bytes[0..7])
                ),
            ));
        }
        let version = u64::from_le_bytes(bytes[7..15].try_into().unwrap_or([0; 8]));
        if version != VERSION {
            return Err(corrupt(
                path,
                7,
                format!("unsupported version {version}, expected {VERSION}"),
            ));
        }
        let code = bytes[15];
        let dtype = Dtype::from_code(code).ok_or_else(|| {
            corrupt(
                path,
                15,
                format!("unknown dtype code {code}, expected 1..=8"),
            )
        })?;
        let chunk_size = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
        let expected = chunk_size
            .checked_mul(dtype.itemsize() as u64)
            .and_then(|n| n.checked_add(HEADER_SIZE as u64));
        match expected {
            Some(expected) if expected == file_len => {}
            Some(expected) => {
                let what = if file_len < expected {
                    "truncated"
                } else {
                    "has trailing bytes"
                };
                return Err(corrupt(
                    path,
                    file_len.min(expected),
                    format!(
                        "{what}: header says {chunk_size} {dtype:?} tokens ({expected} bytes with header), file is {file_len} bytes"
                    ),
                ));
            }
            None => {
                return Err(corrupt(
                    path,
                    16,
                    format!("chunk_size {chunk_size} overflows"),
                ))
            }
        }
        let chunk_size = usize::try_from(chunk_size).map_err(|_| {
            corrupt(
                path,
                16,
                format!("chunk_size {chunk_size} does not fit this machine"),
            )
        })?;
        Ok(Header { dtype, chunk_size })
    }
}

/// A validated, memory-mapped LITPKDS file.
pub struct PackedFile {
    path: PathBuf,
    header: Header,
    map: Mmap,
}

impl std::fmt::Debug for PackedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedFile")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

impl PackedFile {
    /// Opens and validates `path` (magic, version, dtype, exact size).
    pub fn open(path: &Path) -> Result<PackedFile> {
        let file =
            File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error(format!("reading metadata of {}", path.display()), e))?
            .len();
        // SAFETY: the map is read-only; shards are not modified while training reads them.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| io_error(format!("mapping {}", path.display()), e))?;
        let header = Header::parse(path, &map[..map.len().min(HEADER_SIZE)], len)?;
        if map.len() as u64 != len {
            return Err(corrupt(
                path,
                map.len() as u64,
                "file changed size while being opened",
            ));
        }
        Ok(PackedFile {
            path: path.to_path_buf(),
            header,
            map,
        })
    }

    /// Reads only the header and checks it against the file size (no mapping).
    pub fn read_header(path: &Path) -> Result<Header> {
        let file =
            File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error(format!("reading metadata of {}", path.display()), e))?
            .len();
        let mut bytes = Vec::with_capacity(HEADER_SIZE);
        file.take(HEADER_SIZE as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error(format!("reading header of {}", path.display()), e))?;
        Header::parse(path, &bytes, len)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> Header {
        self.header
    }

    pub fn dtype(&self) -> Dtype {
        self.header.dtype
    }

    /// Number of tokens in the file.
    pub fn len(&self) -> usize {
        self.header.chunk_size
    }

    pub fn is_empty(&self) -> bool {
        self.header.chunk_size == 0
    }

    /// Appends tokens `[start, start + count)` to `out` as u32. Negative, fractional or
    /// too-large values are errors naming the byte offset.
    pub fn read_tokens(&self, start: usize, count: usize, out: &mut Vec<u32>) -> Result<()> {
        let end = start
            .checked_add(count)
            .filter(|&end| end <= self.len())
            .ok_or_else(|| {
                RuntimeError::Message(format!(
                    "{}: tokens {start}..{} requested, file holds {}",
                    self.path.display(),
                    start.saturating_add(count),
                    self.len()
                ))
            })?;
        let size = self.header.dtype.itemsize();
        let bytes = &self.map[HEADER_SIZE + start * size..HEADER_SIZE + end * size];
        out.reserve(count);
        let bad = |i: usize, what: String| {
            corrupt(
                &self.path,
                (HEADER_SIZE + (start + i) * size) as u64,
                format!("token {what} is not a valid id"),
            )
        };
        match self.header.dtype {
            Dtype::U8 => out.extend(bytes.iter().map(|&b| b as u32)),
            Dtype::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            ),
            Dtype::I8 => {
                for (i, &b) in bytes.iter().enumerate() {
                    let v = b as i8;
                    out.push(u32::try_from(v).map_err(|_| bad(i, v.to_string()))?);
                }
            }
            Dtype::I16 => {
                for (i, c) in bytes.chunks_exact(2).enumerate() {
                    let v = i16::from_le_bytes([c[0], c[1]]);
                    out.push(u32::try_from(v).map_err(|_| bad(i, v.to_string()))?);
                }
            }
            Dtype::I32 => {
                for (i, c) in bytes.chunks_exact(4).enumerate() {
                    let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    out.push(u32::try_from(v).map_err(|_| bad(i, v.to_string()))?);
                }
            }
            Dtype::I64 => {
                for (i, c) in bytes.chunks_exact(8).enumerate() {
                    let v = i64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
                    out.push(u32::try_from(v).map_err(|_| bad(i, v.to_string()))?);
                }
            }
            Dtype::F32 => {
                for (i, c) in bytes.chunks_exact(4).enumerate() {
                    let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
                    out.push(float_token(v).ok_or_else(|| bad(i, v.to_string()))?);
                }
            }
            Dtype::F64 => {
                for (i, c) in bytes.chunks_exact(8).enumerate() {
                    let v = f64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
                    out.push(float_token(v).ok_or_else(|| bad(i, v.to_string()))?);
                }
            }
        }
        Ok(())
    }

    /// All tokens of the file as u32.
    pub fn tokens(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        self.read_tokens(0, self.len(), &mut out)?;
        Ok(out)
    }
}

fn float_token(v: f64) -> Option<u32> {
    (v.fract() == 0.0 && v >= 0.0 && v <= u32::MAX as f64).then_some(v as u32)
}

/// What to do with the last, partly filled buffer when a writer finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalChunk {
    /// Write it, the tail filled with the separator token (our default: no data lost).
    Pad,
    /// Drop it, as ArchScale's `prepare_slimpajama.py` does.
    Drop,
}

/// What a writer wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteSummary {
    pub files: Vec<PathBuf>,
    /// Document tokens written (separator padding excluded).
    pub tokens: u64,
    pub documents: u64,
    /// Separator tokens that fill the tail of the last file (FinalChunk::Pad).
    pub padding_tokens: u64,
    /// Document tokens dropped with the final partial buffer (FinalChunk::Drop).
    pub dropped_tokens: u64,
}

/// Writes documents back to back into `{prefix}_{counter:010}.bin` files of `chunk_size`
/// tokens each (litgpt `PackedDatasetBuilder`). A buffer is pre-filled with `sep_token`;
/// a document that overflows it is split and continues in the next file. Each file is
/// written to a hidden temporary name and renamed into place, so a crashed writer never
/// leaves a partial shard under a shard name (no fsync: shards are re-derivable input,
/// and one fsync per shard made `prepare` several times slower).
pub struct PackedWriter {
    dir: PathBuf,
    prefix: String,
    header: Header,
    sep_token: u32,
    buffer: Vec<u32>,
    filled: usize,
    counter: usize,
    summary: WriteSummary,
}

impl PackedWriter {
    pub fn new(
        dir: &Path,
        prefix: &str,
        chunk_size: usize,
        dtype: Dtype,
        sep_token: u32,
    ) -> Result<PackedWriter> {
        if chunk_size == 0 {
            return Err(RuntimeError::Message(
                "packed writer: chunk_size must be positive".into(),
            ));
        }
        if matches!(dtype, Dtype::F32 | Dtype::F64) {
            return Err(RuntimeError::Message(format!(
                "packed writer: {dtype:?} is not a token dtype"
            )));
        }
        if sep_token as u64 > dtype.max_token() {
            return Err(RuntimeError::Message(format!(
                "separator token {sep_token} does not fit {dtype:?}"
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
        Ok(PackedWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            header: Header { dtype, chunk_size },
            sep_token,
            buffer: vec![sep_token; chunk_size],
            filled: 0,
            counter: 0,
            summary: WriteSummary::default(),
        })
    }

    /// Files written so far.
    pub fn files_written(&self) -> usize {
        self.counter
    }

    pub fn chunk_size(&self) -> usize {
        self.header.chunk_size
    }

    /// Appends one document (its tokens, EOS included if wanted).
    pub fn add_document(&mut self, tokens: &[u32]) -> Result<()> {
        let max = self.header.dtype.max_token();
        if let Some(&bad) = tokens.iter().find(|&&t| t as u64 > max) {
            return Err(RuntimeError::Message(format!(
                "token id {bad} does not fit the shard dtype {:?}",
                self.header.dtype
            )));
        }
        let mut rest = tokens;
        while self.filled + rest.len() > self.header.chunk_size {
            let part = self.header.chunk_size - self.filled;
            self.buffer[self.filled..].copy_from_slice(&rest[..part]);
            self.filled = self.header.chunk_size;
            self.flush()?;
            rest = &rest[part..];
        }
        self.buffer[self.filled..self.filled + rest.len()].copy_from_slice(rest);
        self.filled += rest.len();
        self.summary.tokens += tokens.len() as u64;
        self.summary.documents += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let name = format!("{}_{:010}.bin", self.prefix, self.counter);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut bytes =
            Vec::with_capacity(HEADER_SIZE + self.buffer.len() * self.header.dtype.itemsize());
        bytes.extend_from_slice(&self.header.to_bytes());
        match self.header.dtype {
            Dtype::U8 => bytes.extend(self.buffer.iter().map(|&t| t as u8)),
            Dtype::I8 => bytes.extend(self.buffer.iter().map(|&t| t as i8 as u8)),
            Dtype::U16 => self
                .buffer
                .iter()
                .for_each(|&t| bytes.extend_from_slice(&(t as u16).to_le_bytes())),
            Dtype::I16 => self
                .buffer
                .iter()
                .for_each(|&t| bytes.extend_from_slice(&(t as i16).to_le_bytes())),
            Dtype::I32 => self
                .buffer
                .iter()
                .for_each(|&t| bytes.extend_from_slice(&(t as i32).to_le_bytes())),
            Dtype::I64 => self
                .buffer
                .iter()
                .for_each(|&t| bytes.extend_from_slice(&(t as i64).to_le_bytes())),
            Dtype::F32 | Dtype::F64 => unreachable!("rejected in PackedWriter::new"),
        }
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&bytes)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_error(format!("writing {}", path.display()), e));
        }
        self.summary.files.push(path);
        self.counter += 1;
        self.buffer.fill(self.sep_token);
        self.filled = 0;
        Ok(())
    }

    /// Writes or drops the last buffer (see [`FinalChunk`]) and returns what was written.
    /// A completely full buffer is always written.
    pub fn finish(mut self, final_chunk: FinalChunk) -> Result<WriteSummary> {
        if self.filled == self.header.chunk_size {
            self.flush()?;
        } else if self.filled > 0 {
            match final_chunk {
                FinalChunk::Pad => {
                    self.summary.padding_tokens = (self.header.chunk_size - self.filled) as u64;
                    self.flush()?;
                }
                FinalChunk::Drop => self.summary.dropped_tokens = self.filled as u64,
            }
        }
        Ok(self.summary)
    }
}

/// `{dir}/{prefix}*.bin`, non-recursive, hidden files excluded, sorted by name (Python's
/// `sorted(glob.glob(...))` order).
pub fn list_shards(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !name.starts_with(prefix) || !name.ends_with(".bin") {
            continue;
        }
        let is_file = entry
            .file_type()
            .map(|t| t.is_file() || t.is_symlink())
            .unwrap_or(false);
        if is_file {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}
