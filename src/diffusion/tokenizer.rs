//! CLIP byte-level BPE tokenizer (the one every Stable Diffusion 1.x text encoder uses), built on
//! the `tokenizers` crate.
//!
//! Three sources give the same token ids:
//! * a Hugging Face `tokenizer.json` ([`ClipTokenizer::from_tokenizer_json`]);
//! * a diffusers `tokenizer/` folder with `vocab.json` + `merges.txt` ([`ClipTokenizer::from_dir`],
//!   [`ClipTokenizer::from_vocab_merges`]), for which the same pipeline as `tokenizer.json` is built
//!   in code: NFC, `\s+` → space, lowercase; split on the CLIP regex; GPT-2 byte-level mapping
//!   without prefix space; BPE with the `</w>` end-of-word suffix; `[bos] ids [eos]`;
//! * the copy bundled in the binary ([`ClipTokenizer::bundled`], `assets/clip/tokenizer.json`), so a
//!   single-file checkpoint (which carries no tokenizer) needs no download.
//!
//! Prompts are padded/truncated the way Stable Diffusion does it:
//! `[bos] + content[..max_length - 2] + [eos]`, padded with the eos/pad token (49407) to 77.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Beginning-of-text token of CLIP (id 49406 in the standard vocabulary).
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// End-of-text token of CLIP (id 49407); Stable Diffusion 1.x also uses it as unk and pad token.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Sequence length of the SD 1.x text encoder (CLIP's `max_position_embeddings`).
pub const DEFAULT_MAX_LENGTH: usize = 77;
/// CLIP's pre-tokenisation regex (from OpenAI's `SimpleTokenizer`, as in `tokenizer.json`).
pub const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Suffix BPE appends to the last symbol of every word.
pub const END_OF_WORD_SUFFIX: &str = "</w>";

/// The CLIP ViT-L/14 `tokenizer.json` shipped with sdpipe (OpenAI CLIP, MIT license; see
/// `assets/clip/README.md`).
static BUNDLED_TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/clip/tokenizer.json");

/// Errors of loading a tokenizer or tokenizing a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file was read but is not a valid tokenizer description.
    #[error("invalid tokenizer file {path}: {message}")]
    Parse {
        /// The file (or `<bundled>` for the embedded copy).
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A folder holds neither `tokenizer.json` nor `vocab.json` + `merges.txt`.
    #[error(
        "tokenizer folder {path} has neither tokenizer.json nor vocab.json + merges.txt \
         (a diffusers model keeps them in its tokenizer/ folder)"
    )]
    MissingFiles {
        /// The folder.
        path: PathBuf,
    },
    /// The vocabulary lacks one of CLIP's special tokens.
    #[error("tokenizer {origin} has no {token:?} token: not a CLIP tokenizer")]
    MissingSpecialToken {
        /// Where the tokenizer came from.
        origin: String,
        /// The missing token.
        token: &'static str,
    },
    /// The tokenizer library failed on a prompt.
    #[error("cannot tokenize prompt {prompt:?}: {message}")]
    Encode {
        /// The prompt.
        prompt: String,
        /// What the library said.
        message: String,
    },
    /// A placeholder token to add already exists as a single token.
    #[error(
        "token {token:?} already exists in the vocabulary (id {id}); pick a placeholder that is \
         not a word of the vocabulary, e.g. \"<{token}>\" (or allow it: textual inversion's \
         `allow_existing_token = true` makes the embedding replace that word)"
    )]
    TokenExists {
        /// The token.
        token: String,
        /// Its existing id.
        id: u32,
    },
    /// A placeholder token is empty or contains whitespace.
    #[error("invalid placeholder token {token:?}: {reason}")]
    InvalidToken {
        /// The token.
        token: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The requested sequence length cannot hold bos and eos.
    #[error("max_length {0} is too small: it must be at least 2 (bos + eos)")]
    MaxLength(usize),
}

/// Result alias for tokenizer operations.
pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A prompt tokenized for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// `max_length` ids: `[bos] + content[..max_length - 2] + [eos]`, padded with the pad id.
    pub input_ids: Vec<u32>,
    /// 1 for bos, content and the first eos, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Length of the untruncated sequence, bos and eos included.
    pub num_tokens_untruncated: usize,
    /// Number of content tokens dropped by truncation (0 when the prompt fits).
    pub dropped_tokens: usize,
}

impl TokenizedPrompt {
    /// Whether the prompt was longer than the text encoder's window.
    pub fn truncated(&self) -> bool {
        self.dropped_tokens > 0
    }
}

/// CLIP BPE tokenizer with Stable Diffusion's padding/truncation and textual-inversion
/// placeholder tokens.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    origin: String,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    /// Placeholders: (token, [token, token_1, ...]) in the order added; a placeholder that
    /// shadows an existing word is stored as `<word>` parts and matched as a whole word.
    placeholders: Vec<(String, Vec<String>)>,
    /// Whether [`ClipTokenizer::add_placeholder`] may shadow an existing single-token word.
    allow_existing: bool,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("max_length", &self.max_length)
            .field("placeholders", &self.placeholders)
            .finish()
    }
}

impl ClipTokenizer {
    /// The CLIP tokenizer bundled with sdpipe (what SD 1.x single-file checkpoints need).
    pub fn bundled() -> Result<Self> {
        Self::from_tokenizer_json_bytes(BUNDLED_TOKENIZER_JSON, "<bundled>")
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_tokenizer_json_bytes(&bytes, &path.display().to_string())
    }

    /// Parses the contents of a `tokenizer.json`; `origin` names it in errors.
    pub fn from_tokenizer_json_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Parse {
            path: PathBuf::from(origin),
            message: e.to_string(),
        })?;
        Self::from_tokenizer(inner, origin.to_string())
    }

    /// Builds the CLIP pipeline from a `vocab.json` and a `merges.txt` (the SD 1.x repository
    /// layout, which has no `tokenizer.json`).
    pub fn from_vocab_merges(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        let (vocab, merges) = (vocab.as_ref(), merges.as_ref());
        for path in [vocab, merges] {
            if !path.is_file() {
                return Err(TokenizerError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
        }
        let origin = format!("{} + {}", vocab.display(), merges.display());
        let parse_err = |message: String| TokenizerError::Parse {
            path: PathBuf::from(&origin),
            message,
        };
        let path_str = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .ok_or_else(|| parse_err(format!("path {} is not valid UTF-8", p.display())))
        };
        let bpe = BPE::from_file(&path_str(vocab)?, &path_str(merges)?)
            .unk_token(EOS_TOKEN.to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD_SUFFIX.to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| parse_err(e.to_string()))?;

        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
                .map_err(|e| parse_err(e.to_string()))?
                .into(),
            Lowercase.into(),
        ]);
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_REGEX.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| parse_err(e.to_string()))?;
        let pre_tokenizer =
            PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);

        let mut inner = Tokenizer::new(bpe);
        inner
            .with_normalizer(Some(normalizer))
            .map_err(|e| parse_err(e.to_string()))?;
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));
        // The specials are plain vocabulary entries of vocab.json; registering them as added
        // tokens makes a literal "<|endoftext|>" in a prompt one token, as tokenizer.json does.
        inner
            .add_special_tokens([
                AddedToken::from(BOS_TOKEN, true).normalized(true),
                AddedToken::from(EOS_TOKEN, true).normalized(true),
            ])
            .map_err(|e| parse_err(e.to_string()))?;
        let bos = lookup(&inner, BOS_TOKEN, &origin)?;
        let eos = lookup(&inner, EOS_TOKEN, &origin)?;
        inner.with_post_processor(Some(
            RobertaProcessing::new((EOS_TOKEN.to_string(), eos), (BOS_TOKEN.to_string(), bos))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        Self::from_tokenizer(inner, origin)
    }

    /// Loads a tokenizer folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`.
    /// `model_max_length` from `tokenizer_config.json` is honoured when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let tokenizer = if json.is_file() {
            Self::from_tokenizer_json(&json)?
        } else if vocab.is_file() && merges.is_file() {
            Self::from_vocab_merges(&vocab, &merges)?
        } else {
            return Err(TokenizerError::MissingFiles {
                path: dir.to_path_buf(),
            });
        };
        let config = dir.join("tokenizer_config.json");
        if !config.is_file() {
            return Ok(tokenizer);
        }
        let text = std::fs::read_to_string(&config).map_err(|source| TokenizerError::Io {
            path: config.clone(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TokenizerError::Parse {
                path: config.clone(),
                message: e.to_string(),
            })?;
        // Some configs store a huge sentinel (int(1e30)) meaning "unset": ignore those.
        match value.get("model_max_length").and_then(|v| v.as_u64()) {
            Some(n) if (2..=1 << 20).contains(&n) => tokenizer.with_max_length(n as usize),
            _ => Ok(tokenizer),
        }
    }

    /// The tokenizer for a model path: the `tokenizer/` folder of a diffusers model (or a
    /// tokenizer folder itself) when there is one, else the bundled CLIP tokenizer (single-file
    /// checkpoints carry none).
    pub fn for_model(model: impl AsRef<Path>) -> Result<Self> {
        let model = model.as_ref();
        if model.is_dir() {
            let sub = model.join("tokenizer");
            if sub.is_dir() {
                return Self::from_dir(sub);
            }
            if model.join("tokenizer.json").is_file() || model.join("vocab.json").is_file() {
                return Self::from_dir(model);
            }
        }
        Self::bundled()
    }

    fn from_tokenizer(mut inner: Tokenizer, origin: String) -> Result<Self> {
        // Padding and truncation are done here, never by the library.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Parse {
                path: PathBuf::from(&origin),
                message: e.to_string(),
            })?;
        let bos_id = lookup(&inner, BOS_TOKEN, &origin)?;
        let eos_id = lookup(&inner, EOS_TOKEN, &origin)?;
        Ok(Self {
            inner,
            origin,
            bos_id,
            eos_id,
            pad_id: eos_id,
            max_length: DEFAULT_MAX_LENGTH,
            placeholders: Vec::new(),
            allow_existing: false,
        })
    }

    /// Sets the padded sequence length (77 for SD 1.x).
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self> {
        if max_length < 2 {
            return Err(TokenizerError::MaxLength(max_length));
        }
        self.max_length = max_length;
        Ok(self)
    }

    /// Padded sequence length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used for padding (`<|endoftext|>` for SD 1.x).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size, added tokens included (49408 for plain CLIP).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Where this tokenizer was loaded from (a path, or `<bundled>`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Rewrites each multi-vector placeholder `<t>` into `<t> <t>_1 … <t>_{n-1}` (what diffusers'
    /// `maybe_convert_prompt` does). [`Self::encode`] calls it itself.
    pub fn expand_placeholders(&self, prompt: &str) -> String {
        let mut prompt = prompt.to_string();
        for (token, parts) in &self.placeholders {
            if parts[0] != *token {
                prompt = replace_whole_word(&prompt, token, &parts.join(" "));
            } else if parts.len() > 1 && prompt.contains(token.as_str()) {
                prompt = prompt.replace(token.as_str(), &parts.join(" "));
            }
        }
        prompt
    }

    fn content_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let prompt = self.expand_placeholders(prompt);
        let encoding =
            self.inner
                .encode(prompt.as_str(), false)
                .map_err(|e| TokenizerError::Encode {
                    prompt: prompt.clone(),
                    message: e.to_string(),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `[bos] + ids + [eos]` without truncation or padding.
    pub fn encode_untruncated(&self, prompt: &str) -> Result<Vec<u32>> {
        let content = self.content_ids(prompt)?;
        let mut ids = Vec::with_capacity(content.len() + 2);
        ids.push(self.bos_id);
        ids.extend(content);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// Token strings of the untruncated sequence (bos and eos included).
    pub fn tokens(&self, prompt: &str) -> Result<Vec<String>> {
        let ids = self.encode_untruncated(prompt)?;
        Ok(ids
            .into_iter()
            .map(|id| self.id_to_token(id).unwrap_or_default())
            .collect())
    }

    /// Tokenizes a prompt to exactly `max_length` ids: `[bos] + content[..max_length - 2] +
    /// [eos]`, padded with the pad id. A longer prompt is truncated: the result says how many
    /// tokens were dropped and a warning is logged.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let content = self.content_ids(prompt)?;
        let room = self.max_length - 2;
        let kept = content.len().min(room);
        let dropped = content.len() - kept;
        if dropped > 0 {
            tracing::warn!(
                dropped_tokens = dropped,
                max_length = self.max_length,
                "prompt is longer than the text encoder's {} tokens: {} token(s) were dropped: \
                 {:?}",
                self.max_length,
                dropped,
                self.decode_lossy(&content[kept..])
            );
        }
        let mut input_ids = Vec::with_capacity(self.max_length);
        input_ids.push(self.bos_id);
        input_ids.extend_from_slice(&content[..kept]);
        input_ids.push(self.eos_id);
        let used = input_ids.len();
        input_ids.resize(self.max_length, self.pad_id);
        let mut attention_mask = vec![1u32; used];
        attention_mask.resize(self.max_length, 0);
        Ok(TokenizedPrompt {
            input_ids,
            attention_mask,
            num_tokens_untruncated: content.len() + 2,
            dropped_tokens: dropped,
        })
    }

    /// Text of `ids` (byte-level decoded, `</w>` word ends turned into spaces), for messages.
    pub fn decode_lossy(&self, ids: &[u32]) -> String {
        let text = match self.inner.decode(ids, true) {
            Ok(t) => t,
            Err(_) => ids
                .iter()
                .filter_map(|&id| self.id_to_token(id))
                .collect::<Vec<_>>()
                .concat(),
        };
        text.replace(END_OF_WORD_SUFFIX, " ").trim().to_string()
    }

    /// [`Self::encode`] for several prompts.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<TokenizedPrompt>> {
        prompts.iter().map(|p| self.encode(p.as_ref())).collect()
    }

    /// Lets [`ClipTokenizer::add_placeholder`] take a word that is already a single token: the
    /// word (matched as a whole word, any case) then means the new token in every prompt, as
    /// A1111 does with embeddings named after a word.
    pub fn allow_existing_tokens(&mut self, on: bool) {
        self.allow_existing = on;
    }

    /// Adds new tokens (e.g. textual-inversion placeholders) and returns their ids, in order.
    /// Each must not already be a single token of the vocabulary (otherwise the new embedding
    /// would silently replace a real word). Added tokens are matched on the normalised
    /// (lowercased) prompt, as transformers' `add_tokens` does.
    pub fn add_tokens(&mut self, tokens: &[&str]) -> Result<Vec<u32>> {
        for (i, token) in tokens.iter().enumerate() {
            if token.trim().is_empty() {
                return Err(TokenizerError::InvalidToken {
                    token: token.to_string(),
                    reason: "it is empty",
                });
            }
            if token.chars().any(char::is_whitespace) {
                return Err(TokenizerError::InvalidToken {
                    token: token.to_string(),
                    reason: "it contains whitespace",
                });
            }
            if tokens[..i].contains(token) {
                return Err(TokenizerError::InvalidToken {
                    token: token.to_string(),
                    reason: "it is listed twice",
                });
            }
            if let Some(id) = self.existing_single_token(token) {
                return Err(TokenizerError::TokenExists {
                    token: token.to_string(),
                    id,
                });
            }
        }
        self.inner
            .add_tokens(
                tokens
                    .iter()
                    .map(|t| AddedToken::from(*t, false).normalized(true)),
            )
            .map_err(|e| TokenizerError::Encode {
                prompt: tokens.join(" "),
                message: e.to_string(),
            })?;
        tokens
            .iter()
            .map(|t| {
                self.token_to_id(t).ok_or_else(|| TokenizerError::Encode {
                    prompt: t.to_string(),
                    message: "token was not registered".to_string(),
                })
            })
            .collect()
    }

    /// Adds a textual-inversion placeholder with `num_vectors` vectors: the tokens `token`,
    /// `token_1`, …, `token_{n-1}` (diffusers' `load_textual_inversion` convention). Prompts
    /// mentioning `token` then take `num_vectors` consecutive positions. Returns the new ids.
    pub fn add_placeholder(&mut self, token: &str, num_vectors: usize) -> Result<Vec<u32>> {
        if num_vectors == 0 {
            return Err(TokenizerError::InvalidToken {
                token: token.to_string(),
                reason: "it needs at least one vector",
            });
        }
        if self.placeholders.iter().any(|(t, _)| t == token) {
            return Err(TokenizerError::InvalidToken {
                token: token.to_string(),
                reason: "it was already added as a placeholder",
            });
        }
        // A word of the vocabulary, when allowed, is shadowed by an added `<word>` token.
        let base = if self.allow_existing && self.existing_single_token(token).is_some() {
            format!("<{}>", token.to_lowercase())
        } else {
            token.to_string()
        };
        let parts: Vec<String> = std::iter::once(base.clone())
            .chain((1..num_vectors).map(|i| format!("{base}_{i}")))
            .collect();
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let ids = self.add_tokens(&refs)?;
        self.placeholders.push((token.to_string(), parts));
        Ok(ids)
    }

    /// The id of `token` when the tokenizer maps it to exactly one token on its own (an
    /// existing vocabulary word, special or added token).
    fn existing_single_token(&self, token: &str) -> Option<u32> {
        if let Some(id) = self.token_to_id(token) {
            return Some(id);
        }
        match self.inner.encode(token, false) {
            Ok(enc) if enc.get_ids().len() == 1 => {
                let id = enc.get_ids()[0];
                // A whole word is stored with the end-of-word suffix ("dog" → "dog</w>").
                let stored = self.id_to_token(id)?;
                let bare = stored.strip_suffix(END_OF_WORD_SUFFIX).unwrap_or(&stored);
                (bare == token.to_lowercase()).then_some(id)
            }
            _ => None,
        }
    }
}

/// `text` with every whole-word, case-insensitive occurrence of `word` replaced by `with`
/// (a word boundary is any character that is not alphanumeric or `_`).
fn replace_whole_word(text: &str, word: &str, with: &str) -> String {
    let lower = text.to_lowercase();
    let needle = word.to_lowercase();
    if needle.is_empty() || lower.len() != text.len() {
        return text.to_string();
    }
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (at, _) in lower.match_indices(&needle) {
        let end = at + needle.len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        if at < last || before.is_some_and(is_word) || after.is_some_and(is_word) {
            continue;
        }
        out.push_str(&text[last..at]);
        out.push_str(with);
        last = end;
    }
    out.push_str(&text[last..]);
    out
}

fn lookup(tokenizer: &Tokenizer, token: &'static str, origin: &str) -> Result<u32> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| TokenizerError::MissingSpecialToken {
            origin: origin.to_string(),
            token,
        })
}

#[cfg(test)]
mod tests {
    use super::replace_whole_word;

    #[test]
    fn whole_words_only_any_case() {
        assert_eq!(
            replace_whole_word("a Dog and a dog, hotdog, dog_x dog", "dog", "<dog>"),
            "a <dog> and a <dog>, hotdog, dog_x <dog>"
        );
        assert_eq!(replace_whole_word("no match", "dog", "<dog>"), "no match");
    }
}
