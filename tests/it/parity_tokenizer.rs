//! Token ids must equal the `tokenizers`/transformers reference exactly on every case of
//! `tests/fixtures/tokenizer_cases.json`, from `tokenizer.json`, from the diffusers
//! `vocab.json` + `merges.txt` folder and from the bundled copy.

use std::path::PathBuf;

use sdpipe::diffusion::tokenizer::{ClipTokenizer, TokenizerError};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    attention_mask: Vec<u32>,
    ids_untruncated: Vec<u32>,
    tokens_untruncated: Vec<String>,
    truncated: bool,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            input_ids: ids(&c["input_ids"]),
            attention_mask: ids(&c["attention_mask"]),
            ids_untruncated: ids(&c["ids_untruncated"]),
            tokens_untruncated: c["tokens_untruncated"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect(),
            truncated: c["truncated"].as_bool().unwrap(),
        })
        .collect()
}

fn check_all(tok: &ClipTokenizer, name: &str) {
    let cases = cases();
    assert_eq!(cases.len(), 23, "fixture case count");
    let mut mismatches = Vec::new();
    for case in &cases {
        let untrunc = tok.encode_untruncated(&case.prompt).unwrap();
        let enc = tok.encode(&case.prompt).unwrap();
        if untrunc != case.ids_untruncated {
            mismatches.push(format!(
                "{name}: untruncated ids of {:?}\n  got  {untrunc:?}\n  want {:?}",
                case.prompt, case.ids_untruncated
            ));
        }
        if enc.input_ids != case.input_ids {
            mismatches.push(format!(
                "{name}: input_ids of {:?}\n  got  {:?}\n  want {:?}",
                case.prompt, enc.input_ids, case.input_ids
            ));
        }
        if enc.attention_mask != case.attention_mask {
            mismatches.push(format!("{name}: attention mask of {:?}", case.prompt));
        }
        if enc.truncated() != case.truncated {
            mismatches.push(format!(
                "{name}: truncated flag of {:?}: got {}",
                case.prompt,
                enc.truncated()
            ));
        }
        let expected_dropped = case.ids_untruncated.len().saturating_sub(77);
        if enc.dropped_tokens != expected_dropped
            || enc.num_tokens_untruncated != case.ids_untruncated.len()
        {
            mismatches.push(format!(
                "{name}: dropped count of {:?}: got {} want {expected_dropped}",
                case.prompt, enc.dropped_tokens
            ));
        }
        let tokens = tok.tokens(&case.prompt).unwrap();
        if tokens != case.tokens_untruncated {
            mismatches.push(format!("{name}: token strings of {:?}", case.prompt));
        }
    }
    println!(
        "{name}: {} cases, {} mismatches",
        cases.len(),
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn tokenizer_json_matches_reference() {
    let tok =
        ClipTokenizer::from_tokenizer_json(fixtures().join("../../assets/clip/tokenizer.json"))
            .unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    check_all(&tok, "tokenizer.json");
}

#[test]
fn vocab_merges_folder_matches_reference() {
    let tok = ClipTokenizer::from_dir(fixtures().join("tiny-sd/tokenizer")).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(tok.max_length(), 77);
    check_all(&tok, "vocab.json+merges.txt");
}

#[test]
fn bundled_matches_reference() {
    let tok = ClipTokenizer::bundled().unwrap();
    check_all(&tok, "bundled");
}

#[test]
fn known_ids_and_truncation_count() {
    let tok = ClipTokenizer::bundled().unwrap();
    let enc = tok.encode("a photo of sks dog").unwrap();
    assert_eq!(
        &enc.input_ids[..8],
        &[49406, 320, 1125, 539, 48136, 1929, 49407, 49407]
    );
    assert_eq!(enc.dropped_tokens, 0);
    let long = "word ".repeat(100);
    let enc = tok.encode(&long).unwrap();
    assert_eq!(enc.input_ids.len(), 77);
    assert_eq!(enc.dropped_tokens, 25);
    assert_eq!(enc.input_ids[76], 49407);
    let short = tok.clone().with_max_length(10).unwrap();
    let enc = short
        .encode("a photo of sks dog on the beach at sunset")
        .unwrap();
    assert_eq!(enc.input_ids.len(), 10);
    assert_eq!(enc.dropped_tokens, 2);
}

#[test]
fn placeholder_tokens_follow_diffusers_textual_inversion() {
    // README §5: `<sks>` with 2 vectors → ids 49408, 49409; `<cat-toy>` single vector.
    for mut tok in [
        ClipTokenizer::bundled().unwrap(),
        ClipTokenizer::from_dir(fixtures().join("tiny-sd/tokenizer")).unwrap(),
    ] {
        let ids = tok.add_placeholder("<sks>", 2).unwrap();
        assert_eq!(ids, vec![49408, 49409]);
        let enc = tok.encode("a photo of <sks>").unwrap();
        assert_eq!(
            &enc.input_ids[..8],
            &[49406, 320, 1125, 539, 49408, 49409, 49407, 49407]
        );
        assert_eq!(tok.vocab_size(), 49410);

        let mut tok2 = ClipTokenizer::bundled().unwrap();
        assert_eq!(tok2.add_placeholder("<cat-toy>", 1).unwrap(), vec![49408]);
        let enc = tok2.encode("a <cat-toy> on a table").unwrap();
        assert_eq!(
            &enc.input_ids[..8],
            &[49406, 320, 49408, 525, 320, 2175, 49407, 49407]
        );
        // Existing single tokens are refused.
        for existing in ["sks", "dog", "DOG", "<|endoftext|>", "<sks>"] {
            match tok.add_tokens(&[existing]) {
                Err(TokenizerError::TokenExists { .. }) => {}
                other => panic!("{existing}: expected TokenExists, got {other:?}"),
            }
        }
        assert!(matches!(
            tok.add_tokens(&["two words"]),
            Err(TokenizerError::InvalidToken { .. })
        ));
    }
}

#[test]
fn missing_folder_is_a_clear_error() {
    let err = ClipTokenizer::from_dir(fixtures().join("no-such-dir")).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingFiles { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"));
}

#[test]
fn truncation_warns_with_the_dropped_count_and_text() {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let tok = ClipTokenizer::bundled().unwrap();
    let prompt = format!("{} tail end", "word ".repeat(75));
    // Other tests' threads may cache this callsite's interest while no subscriber listens:
    // rebuild it with this one in place, and again should another thread's registration race
    // in between (the warning is then filtered out; it has been seen once on CI).
    let enc = tracing::subscriber::with_default(subscriber, || {
        let mut enc = None;
        for _ in 0..20 {
            tracing::callsite::rebuild_interest_cache();
            enc = Some(tok.encode(&prompt).unwrap());
            if !buf.0.lock().unwrap().is_empty() {
                break;
            }
        }
        enc.unwrap()
    });
    assert_eq!(enc.dropped_tokens, 2);
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("dropped_tokens=2"), "{log}");
    assert!(log.contains("\"tail end\""), "{log}");
    // A prompt that fits logs nothing.
    let buf2 = Buf::default();
    let writer2 = buf2.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer2.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || tok.encode("a photo").unwrap());
    assert!(buf2.0.lock().unwrap().is_empty());
}

#[test]
fn pipeline_prompt_ids_and_model_lookup() {
    // The ids the diffusers pipeline golden was made with.
    let bytes = std::fs::read(fixtures().join("goldens/pipeline_ddim4.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = |name: &str| -> Vec<u32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    };
    // A diffusers model folder (here: the fixture's tokenizer folder's parent) and a
    // single-file path (bundled tokenizer) give the same ids.
    for tok in [
        ClipTokenizer::for_model(fixtures().join("tiny-sd")).unwrap(),
        ClipTokenizer::for_model(fixtures().join("model.safetensors")).unwrap(),
    ] {
        assert_eq!(
            tok.encode("a photo of sks dog").unwrap().input_ids,
            ids("input_ids_cond")
        );
        assert_eq!(tok.encode("").unwrap().input_ids, ids("input_ids_uncond"));
    }
    assert_eq!(
        ClipTokenizer::for_model(fixtures().join("tiny-sd"))
            .unwrap()
            .origin(),
        format!(
            "{} + {}",
            fixtures().join("tiny-sd/tokenizer/vocab.json").display(),
            fixtures().join("tiny-sd/tokenizer/merges.txt").display()
        )
    );
    assert_eq!(
        ClipTokenizer::for_model("/no/such.safetensors")
            .unwrap()
            .origin(),
        "<bundled>"
    );
}

/// The pipeline built in code from vocab.json + merges.txt must behave like tokenizer.json on
/// arbitrary text, not only on the fixture prompts.
#[test]
fn folder_and_json_agree_on_random_text() {
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{Rng, SeedableRng};

    let json = ClipTokenizer::bundled().unwrap();
    let folder = ClipTokenizer::from_dir(fixtures().join("tiny-sd/tokenizer")).unwrap();
    let pool: Vec<char> = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     \
        \t\n.,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|éèêëàâäçñößøåÉÀÇ東京タワー夜景Ωμέγα Привет 🐶😎👍🏽ﬁ\u{301}"
        .chars()
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut specials = ["<|startoftext|>", "<|endoftext|>", "'s", "'ll", "don't"]
        .iter()
        .cycle();
    for k in 0..300 {
        let len = (rng.next_u32() % 60) as usize;
        let mut text: String = (0..len)
            .map(|_| pool[(rng.next_u32() as usize) % pool.len()])
            .collect();
        if k % 5 == 0 {
            text.push_str(specials.next().unwrap());
        }
        assert_eq!(
            json.encode_untruncated(&text).unwrap(),
            folder.encode_untruncated(&text).unwrap(),
            "{text:?}"
        );
    }
}
