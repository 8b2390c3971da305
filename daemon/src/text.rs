//! Text side of generation: the tokenizer, a streaming detokenizer that only
//! ever emits whole UTF-8 characters, and stop-sequence matching across token
//! boundaries.

use std::path::Path;

use crate::model::ModelError;

/// A Hugging Face `tokenizer.json`, loaded once per model.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Load `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "tokenizer (tokenizer.json)",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TextError(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TextError(format!("cannot detokenize: {e}")))
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token given by its text (`<|endoftext|>`), if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The tokenizer refused a text or an id sequence.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TextError(pub String);

const REPLACEMENT: char = '\u{FFFD}';

/// Turns a token stream into text pieces that are always whole characters.
///
/// Each new token is decoded together with a few tokens before it (so decoders
/// that look at context, such as SentencePiece's leading-space rule, agree
/// with a full decode); a piece that would end inside a UTF-8 sequence (shown
/// by the decoder as U+FFFD) is held until the sequence completes. The
/// concatenation of all pieces plus [`StreamDecoder::finish`] equals the
/// decode of the whole sequence.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the context window used for the next decode.
    prefix: usize,
    /// Tokens before this index have been emitted.
    read: usize,
}

impl StreamDecoder {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// All tokens pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Add one token; returns the text that became complete, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TextError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with(REPLACEMENT) && now.starts_with(&before) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// Whatever is still held back (an incomplete character at the very end
    /// decodes to U+FFFD, exactly as in a full decode).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TextError> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(match now.strip_prefix(&before) {
            Some(rest) => rest.to_string(),
            None => now,
        })
    }
}

/// Holds back text that could still become a stop sequence, and finds stops
/// that span several tokens. Stop text is never emitted.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What [`StopMatcher::push`] decided for the text seen so far.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text (possibly empty) and go on.
    Continue(String),
    /// A stop sequence matched: emit this text, then finish.
    Stop(String),
}

impl StopMatcher {
    /// Match these stop sequences (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Feed decoded text.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_string());
        }
        self.held.push_str(text);
        // The earliest stop occurrence wins.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopCheck::Stop(out);
        }
        // Keep the longest suffix that is a proper prefix of some stop.
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices() {
            let tail = &self.held[i..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = i;
                break;
            }
        }
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopCheck::Continue(out)
    }

    /// Text still held at the end of generation (no stop came).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_tokenizer() -> Tokenizer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/kjv-gpt2/tokenizer.json");
        Tokenizer::from_file(&root).expect("demo tokenizer")
    }

    #[test]
    fn stream_emits_whole_characters_and_the_full_text() {
        let tok = demo_tokenizer();
        for text in [
            "今天天气很好，我们去公园散步。",
            "fire 🔥🎉 and 👩‍👩‍👧 family",
            "In the beginning God created",
            "Ünïcödé ∑ x² — ok",
        ] {
            let ids = tok.encode(text).unwrap();
            let mut dec = StreamDecoder::new();
            let mut out = String::new();
            for &id in &ids {
                if let Some(piece) = dec.push(&tok, id).unwrap() {
                    assert!(!piece.contains(REPLACEMENT), "split character in {piece:?}");
                    out.push_str(&piece);
                }
            }
            out.push_str(&dec.finish(&tok).unwrap());
            assert_eq!(out, text);
            assert_eq!(out, tok.decode(&ids).unwrap());
        }
    }

    #[test]
    fn stream_of_broken_utf8_matches_the_lossy_full_decode() {
        let tok = demo_tokenizer();
        // The first byte of "今" alone, then ASCII: invalid UTF-8 mid-stream.
        let ids = tok.encode("今").unwrap();
        let mut seq = vec![ids[0]];
        seq.extend(tok.encode("ab").unwrap());
        seq.push(ids[0]); // and a dangling lead byte at the very end
        let mut dec = StreamDecoder::new();
        let mut out = String::new();
        for &id in &seq {
            out.push_str(&dec.push(&tok, id).unwrap().unwrap_or_default());
        }
        out.push_str(&dec.finish(&tok).unwrap());
        assert_eq!(out, tok.decode(&seq).unwrap());
    }

    #[test]
    fn stop_sequence_across_token_boundaries_is_not_emitted() {
        let mut m = StopMatcher::new(&["\n\nThe".into(), "END".into()]);
        assert_eq!(m.push("Hello"), StopCheck::Continue("Hello".into()));
        assert_eq!(m.push(" wor"), StopCheck::Continue(" wor".into()));
        assert_eq!(m.push("ld\n"), StopCheck::Continue("ld".into()));
        assert_eq!(m.push("\nT"), StopCheck::Continue(String::new()));
        assert_eq!(m.push("hey"), StopCheck::Stop(String::new()));
        let mut m = StopMatcher::new(&["END".into()]);
        assert_eq!(m.push("aE"), StopCheck::Continue("a".into()));
        assert_eq!(m.push("Nx"), StopCheck::Continue("ENx".into()));
        assert_eq!(m.push("yyEN"), StopCheck::Continue("yy".into()));
        assert_eq!(m.push("Dzz"), StopCheck::Stop(String::new()));
        let mut m = StopMatcher::new(&["END".into()]);
        m.push("tail E");
        assert_eq!(m.flush(), "E");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_text_is_safe() {
        let mut m = StopMatcher::new(&["好".into(), "很".into()]);
        assert_eq!(m.push("今天天气很好"), StopCheck::Stop("今天天气".into()));
        let mut m = StopMatcher::new(&["天气x".into()]);
        assert_eq!(m.push("今天天"), StopCheck::Continue("今天".into()));
        assert_eq!(m.push("气很"), StopCheck::Continue("天气很".into()));
    }
}
