//! Diagnostics: every error names its source, carries a span inside it, and says how to fix it.

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// A text that spans point into: a spec file, a builtin arch, or a `--set` argument.
pub struct SourceFile {
    pub name: String,
    pub text: Arc<String>,
    named: NamedSource<Arc<String>>,
}

impl fmt::Debug for SourceFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceFile")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Arc<Self> {
        let (name, text) = (name.into(), Arc::new(text.into()));
        let named = NamedSource::new(name.clone(), text.clone()).with_language("TOML");
        Arc::new(Self { name, text, named })
    }

    /// The source as miette renders it (with its name).
    pub fn named_source(&self) -> &NamedSource<Arc<String>> {
        &self.named
    }

    /// Clamp a byte range into the text (so every label is inside its source).
    pub fn clamp(&self, span: Range<usize>) -> Range<usize> {
        let len = self.text.len();
        let start = span.start.min(len);
        let end = span.end.clamp(start, len);
        start..end
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        (line, col)
    }
}

/// Shown when an error has no specific help of its own.
pub const DEFAULT_HELP: &str =
    "`archscale schema experiment` and `archscale schema arch` list every key with its type and default";

/// One problem in a spec, pointing at the exact span that causes it.
#[derive(Debug, Clone)]
pub struct SpecError {
    pub message: String,
    pub src: Arc<SourceFile>,
    pub span: Range<usize>,
    pub label: String,
    pub help: Option<String>,
    /// More spans in the same source (e.g. the other end of a conflict).
    pub extra: Vec<(Range<usize>, String)>,
}

impl SpecError {
    pub fn new(src: &Arc<SourceFile>, span: Range<usize>, message: impl Into<String>) -> Self {
        let span = src.clamp(span);
        Self {
            message: message.into(),
            src: src.clone(),
            span,
            label: "here".into(),
            help: None,
            extra: vec![],
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn also(mut self, span: Range<usize>, label: impl Into<String>) -> Self {
        let span = self.src.clamp(span);
        self.extra.push((span, label.into()));
        self
    }

    /// `file:line:col` of the primary span.
    pub fn location(&self) -> String {
        let (line, col) = self.src.line_col(self.span.start);
        format!("{}:{}:{}", self.src.name, line, col)
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SpecError {}

impl Diagnostic for SpecError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.location()))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.help.as_deref().unwrap_or(DEFAULT_HELP)))
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(self.src.named_source() as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let primary = LabeledSpan::new_primary_with_span(
            Some(self.label.clone()),
            to_source_span(&self.span),
        );
        let extra = self
            .extra
            .iter()
            .map(|(s, l)| LabeledSpan::new_with_span(Some(l.clone()), to_source_span(s)));
        Some(Box::new(std::iter::once(primary).chain(extra)))
    }
}

fn to_source_span(span: &Range<usize>) -> SourceSpan {
    SourceSpan::new(span.start.into(), span.end - span.start)
}

/// All errors found in one or more spec files; renders every one of them.
#[derive(Debug, Clone, Default)]
pub struct SpecErrors {
    pub errors: Vec<SpecError>,
}

impl SpecErrors {
    pub fn new(errors: Vec<SpecError>) -> Self {
        Self { errors }
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn push(&mut self, e: SpecError) {
        self.errors.push(e);
    }

    /// Drop exact duplicates (same source, span and message), keeping first occurrences.
    pub fn dedup(&mut self) {
        let mut seen = std::collections::HashSet::new();
        self.errors
            .retain(|e| seen.insert((e.src.name.clone(), e.span.clone(), e.message.clone())));
    }

    /// Render with miette's graphical handler (no colour): what the CLI prints.
    pub fn render(&self) -> String {
        let handler =
            miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
                .with_width(100);
        let mut out = String::new();
        for e in &self.errors {
            let _ = handler.render_report(&mut out, e);
        }
        out
    }
}

impl From<SpecError> for SpecErrors {
    fn from(e: SpecError) -> Self {
        Self { errors: vec![e] }
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files: std::collections::BTreeSet<&str> =
            self.errors.iter().map(|e| e.src.name.as_str()).collect();
        let files: Vec<&str> = files.into_iter().collect();
        let n = self.errors.len();
        write!(
            f,
            "{n} error{} in {}",
            if n == 1 { "" } else { "s" },
            files.join(", ")
        )
    }
}

impl std::error::Error for SpecErrors {}

impl Diagnostic for SpecErrors {
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        Some(Box::new(self.errors.iter().map(|e| e as &dyn Diagnostic)))
    }
}

/// The closest candidate by edit distance, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(&str, f64)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(word, c);
        let close = strsim::levenshtein(word, c) <= (word.len().max(c.len()) / 3).max(1);
        if (score >= 0.8 || close) && best.is_none_or(|(_, s)| score > s) {
            best = Some((c, score));
        }
    }
    best.map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_is_one_based() {
        let src = SourceFile::new("a.toml", "x = 1\ny = 2\n");
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(6), (2, 1));
        assert_eq!(src.line_col(10), (2, 5));
    }

    #[test]
    fn did_you_mean_finds_typos() {
        assert_eq!(
            did_you_mean("lerning_rate", ["lr", "learning_rate", "depth"]),
            Some("learning_rate")
        );
        assert_eq!(
            did_you_mean("seq_lem", ["seq_len", "seed"]),
            Some("seq_len")
        );
        assert_eq!(did_you_mean("zzzz", ["seq_len", "seed"]), None);
    }

    #[test]
    fn render_names_file_line_col_and_help() {
        let src = SourceFile::new("exp.toml", "a = 1\nbad = 2\n");
        let errs = SpecErrors::new(vec![
            SpecError::new(&src, 6..9, "unknown key `bad`").help("remove it")
        ]);
        let text = errs.render();
        assert!(text.contains("exp.toml:2:1"), "{text}");
        assert!(text.contains("remove it"), "{text}");
    }
}
