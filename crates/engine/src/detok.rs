//! Incremental detokenization and stop strings.
//!
//! Text is released only when it is final: never half a UTF-8 character (a byte-fallback
//! token may end mid-character) and never a prefix that a stop string might still complete.

use glassbox_model::Tokenizer;

pub struct Detokenizer {
    /// Generated tokens.
    tokens: Vec<u32>,
    /// Decoding starts here (a little context before `read` for correct spacing).
    prefix: usize,
    read: usize,
    /// All generated text so far.
    text: String,
    /// How much of `text` has been handed out.
    emitted: usize,
    stop: Vec<String>,
    hold: usize,
}

pub enum StopMatch {
    None,
    /// A stop string matched; the text was cut before it.
    Stop,
}

impl Detokenizer {
    pub fn new(stop: Vec<String>) -> Self {
        let hold = stop.iter().map(|s| s.chars().count()).max().unwrap_or(1).saturating_sub(1);
        Detokenizer { tokens: vec![], prefix: 0, read: 0, text: String::new(), emitted: 0, stop, hold }
    }

    /// Add a token; returns whether a stop string now matches. A token the tokenizer cannot
    /// decode (an id past its vocabulary, say) is an error for this sequence.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> Result<StopMatch, String> {
        if token as usize >= tok.vocab_size() {
            return Err(format!("token id {token} is outside the tokenizer's vocabulary ({})", tok.vocab_size()));
        }
        self.tokens.push(token);
        let decode = |ids: &[u32]| tok.decode(ids, true).map_err(|e| format!("cannot detokenize token {token}: {e}"));
        let before = decode(&self.tokens[self.prefix..self.read])?;
        let after = decode(&self.tokens[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before) {
            let start = self.text.len();
            self.text.push_str(&after[before.len()..]);
            self.prefix = self.read;
            self.read = self.tokens.len();
            // Look for a stop string that may straddle the old and new text.
            let longest = self.stop.iter().map(|s| s.len()).max().unwrap_or(0);
            let from = floor_char(&self.text, start.saturating_sub(longest));
            let hit = self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
            if let Some(at) = hit {
                self.text.truncate(at);
                return Ok(StopMatch::Stop);
            }
        }
        Ok(StopMatch::None)
    }

    /// Text that is final now. With `finished`, everything left.
    pub fn take(&mut self, finished: bool) -> String {
        let end = if finished {
            self.text.len()
        } else {
            // Hold back what a stop string could still claim.
            let mut end = self.text.len();
            for _ in 0..self.hold {
                if end == self.emitted {
                    break;
                }
                end = floor_char(&self.text, end - 1);
            }
            end.max(self.emitted)
        };
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn stories_tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K");
        Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
    }

    #[test]
    fn never_emits_half_a_character() {
        // stories260K's 512-token vocabulary spells the llama with byte-fallback tokens.
        let tok = stories_tokenizer();
        let ids = tok.encode("a 🦙 b", false).unwrap();
        assert!(ids.len() >= 6, "{ids:?}");
        let mut d = Detokenizer::new(vec![]);
        let mut pieces = vec![];
        for &id in &ids {
            d.push(&tok, id).unwrap();
            pieces.push(d.take(false));
        }
        pieces.push(d.take(true));
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), "a 🦙 b");
    }

    #[test]
    fn holds_back_what_a_stop_string_may_claim() {
        let tok = stories_tokenizer();
        let mut d = Detokenizer::new(vec!["girl named".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for id in tok.encode("there was a little girl named Lily", false).unwrap() {
            if let StopMatch::Stop = d.push(&tok, id).unwrap() {
                stopped = true;
                break;
            }
            out.push_str(&d.take(false));
            // "girl" could still become "girl named": it must not have left yet.
            assert!(!out.contains("gir"), "{out:?}");
        }
        out.push_str(&d.take(true));
        assert!(stopped);
        assert_eq!(out, "there was a little ");
    }
}
