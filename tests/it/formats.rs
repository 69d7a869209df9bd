//! File formats: LoRA (kohya / diffusers / PEFT), textual-inversion embeddings, the torch
//! checkpoint archive and A1111 hypernetworks, against the fixtures in tests/fixtures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sdpipe::formats::lora::{
    KnownModules, KohyaMetadata, LoraComponent, LoraFormat, LoraModule, LoraNetwork, read_lora,
    write_kohya,
};
use sdpipe::formats::{HostTensor, read_safetensors, write_safetensors};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn unet_known() -> KnownModules {
    let w = read_safetensors(&fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors")).unwrap();
    KnownModules::from_weights(
        w.tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.shape.as_slice())),
    )
}

#[test]
fn lora_three_layouts_decode_identically() {
    let known = unet_known();
    let (kohya, f1) = read_lora(&fixture("lora/lora_kohya.safetensors"), None).unwrap();
    let (kohya_k, _) = read_lora(&fixture("lora/lora_kohya.safetensors"), Some(&known)).unwrap();
    let (diff, f2) = read_lora(&fixture("lora/lora_diffusers"), Some(&known)).unwrap();
    let (diff_file, _) = read_lora(
        &fixture("lora/lora_diffusers/pytorch_lora_weights.safetensors"),
        None,
    )
    .unwrap();
    let (peft, f3) = read_lora(&fixture("lora/lora_peft"), Some(&known)).unwrap();
    assert_eq!(
        (f1, f2, f3),
        (LoraFormat::Kohya, LoraFormat::Diffusers, LoraFormat::Peft)
    );
    assert_eq!(kohya.unet.len(), 32);
    assert!(kohya.text_encoder.is_empty());
    for m in kohya.unet.values() {
        assert_eq!(m.rank(), 4);
        assert_eq!(m.alpha(), 2.0);
    }
    assert!(
        kohya
            .unet
            .contains_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    );
    // Bitwise equal: the same A/B/alpha from every layout.
    assert_eq!(kohya, kohya_k);
    assert_eq!(kohya, diff);
    assert_eq!(kohya, diff_file);
    assert_eq!(kohya, peft);
}

#[test]
fn lora_diffusers_without_metadata_defaults_alpha_to_rank() {
    let src = read_safetensors(&fixture(
        "lora/lora_diffusers/pytorch_lora_weights.safetensors",
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plain.safetensors");
    write_safetensors(&p, &src.tensors, None).unwrap();
    let (net, fmt) = read_lora(&p, None).unwrap();
    assert_eq!(fmt, LoraFormat::Diffusers);
    assert!(net.unet.values().all(|m| m.alpha() == 4.0));
}

#[test]
fn lora_merged_weights_match_golden() {
    let (net, _) = read_lora(&fixture("lora/lora_kohya.safetensors"), None).unwrap();
    let w = read_safetensors(&fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let golden = read_safetensors(&fixture("goldens/lora.safetensors")).unwrap();
    let mut worst = 0.0f32;
    for (module, m) in &net.unet {
        let mut weight = w.tensors[&format!("{module}.weight")].clone();
        m.merge_into(&mut weight, 1.0).unwrap();
        let g = &golden.tensors[&format!("merged.{module}.weight")];
        worst = worst.max(weight.max_abs_diff(g));
    }
    println!("merged LoRA weights (32 modules): max abs error {worst:e}");
    assert!(worst <= 1e-6, "max abs error {worst}");
    // A weight of the wrong shape is refused.
    let m = &net.unet["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"];
    let mut wrong = HostTensor::zeros(vec![32, 32]);
    assert!(m.merge_into(&mut wrong, 1.0).is_err());
}

#[test]
fn lora_conv_delta_and_scale() {
    // up [2, 1] @ down [1, 1, 2, 2] with alpha 0.5 (scale 0.5), multiplier 2.
    let m = LoraModule {
        down: HostTensor::new(vec![1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
        up: HostTensor::new(vec![2, 1], vec![1.0, -2.0]).unwrap(),
        alpha: 0.5,
    };
    let d = m.delta(2.0);
    assert_eq!(d.shape, vec![2, 1, 2, 2]);
    assert_eq!(d.data, vec![1.0, 2.0, 3.0, 4.0, -2.0, -4.0, -6.0, -8.0]);
}

fn sample_network() -> LoraNetwork {
    let mut net = LoraNetwork::default();
    let t = |shape: Vec<usize>, seed: f32| {
        let n = shape.iter().product::<usize>();
        HostTensor::new(
            shape,
            (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect(),
        )
        .unwrap()
    };
    net.unet.insert(
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0".into(),
        LoraModule {
            down: t(vec![3, 8], 0.1),
            up: t(vec![5, 3], 0.2),
            alpha: 1.5,
        }
        .into(),
    );
    net.unet.insert(
        "up_blocks.1.resnets.0.conv_shortcut".into(),
        LoraModule {
            down: t(vec![2, 6, 3, 3], 0.3),
            up: t(vec![4, 2], 0.4),
            alpha: 2.0,
        }
        .into(),
    );
    net.unet.insert(
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj".into(),
        LoraModule {
            down: t(vec![3, 8], 0.5),
            up: t(vec![16, 3], 0.6),
            alpha: 3.0,
        }
        .into(),
    );
    net.text_encoder.insert(
        "text_model.encoder.layers.11.self_attn.q_proj".into(),
        LoraModule {
            down: t(vec![3, 7], 0.7),
            up: t(vec![7, 3], 0.8),
            alpha: 1.0,
        }
        .into(),
    );
    net.text_encoder.insert(
        "text_model.encoder.layers.0.mlp.fc1".into(),
        LoraModule {
            down: t(vec![3, 7], 0.9),
            up: t(vec![9, 3], 1.0),
            alpha: 3.0,
        }
        .into(),
    );
    net
}

#[test]
fn lora_kohya_write_read_round_trip() {
    let net = sample_network();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.safetensors");
    let meta = KohyaMetadata {
        base_model_hash: Some("abcd1234".into()),
        steps: Some(300),
        resolution: Some((512, 512)),
        learning_rate: Some(1e-4),
        unet_lr: Some(1e-4),
        text_encoder_lr: Some(5e-5),
        num_train_images: Some(20),
        dataset_dirs: BTreeMap::from([("10_sks dog".to_string(), (10, 20))]),
        ..Default::default()
    };
    write_kohya(&p, &net, &meta).unwrap();
    let (back, fmt) = read_lora(&p, None).unwrap();
    assert_eq!(fmt, LoraFormat::Kohya);
    assert_eq!(back, net);
    let raw = read_safetensors(&p).unwrap();
    let md = &raw.metadata;
    assert_eq!(md["ss_network_module"], "networks.lora");
    assert_eq!(md["ss_base_model_version"], "sd_v1");
    assert_eq!(md["ss_network_dim"], "3"); // the first module in key order
    assert_eq!(md["ss_network_alpha"], "1.5");
    assert_eq!(md["ss_sd_model_hash"], "abcd1234");
    assert_eq!(md["ss_steps"], "300");
    assert_eq!(md["ss_resolution"], "(512, 512)");
    assert_eq!(md["ss_learning_rate"], "0.0001");
    assert_eq!(md["ss_text_encoder_lr"], "5e-5");
    assert_eq!(md["ss_num_train_images"], "20");
    let dirs: serde_json::Value = serde_json::from_str(&md["ss_dataset_dirs"]).unwrap();
    assert_eq!(dirs["10_sks dog"]["n_repeats"], 10);
    assert_eq!(dirs["10_sks dog"]["img_count"], 20);
    // Conv up is stored [out, rank, 1, 1], alpha as a scalar, TE under lora_te_.
    assert_eq!(
        raw.tensors["lora_unet_up_blocks_1_resnets_0_conv_shortcut.lora_up.weight"].shape,
        vec![4, 2, 1, 1]
    );
    assert_eq!(
        raw.tensors["lora_unet_up_blocks_1_resnets_0_conv_shortcut.alpha"].shape,
        Vec::<usize>::new()
    );
    assert!(
        raw.tensors
            .contains_key("lora_te_text_model_encoder_layers_11_self_attn_q_proj.lora_down.weight")
    );
    assert_eq!(net.modules(LoraComponent::TextEncoder).len(), 2);
}

#[test]
fn lora_foreign_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let t = |s: Vec<usize>| HostTensor::zeros(s);
    // SDXL / LDM block names.
    let p = dir.path().join("sdxl.safetensors");
    let tensors = BTreeMap::from([
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
                .to_string(),
            t(vec![4, 640]),
        ),
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight".to_string(),
            t(vec![640, 4]),
        ),
    ]);
    write_safetensors(&p, &tensors, None).unwrap();
    let e = read_lora(&p, None).unwrap_err().to_string();
    assert!(
        e.contains("lora_unet_input_blocks_4_1") && e.contains("SDXL"),
        "{e}"
    );
    // Shapes that do not fit the model.
    let p = dir.path().join("wide.safetensors");
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let tensors = BTreeMap::from([
        (format!("{k}.lora_down.weight"), t(vec![4, 320])),
        (format!("{k}.lora_up.weight"), t(vec![320, 4])),
    ]);
    write_safetensors(&p, &tensors, None).unwrap();
    assert!(read_lora(&p, None).is_ok());
    let e = read_lora(&p, Some(&unet_known())).unwrap_err().to_string();
    assert!(
        e.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
            && e.contains("[32, 32]"),
        "{e}"
    );
    // A module the model lacks.
    let p = dir.path().join("missing.safetensors");
    let k = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q";
    let tensors = BTreeMap::from([
        (format!("{k}.lora_down.weight"), t(vec![4, 32])),
        (format!("{k}.lora_up.weight"), t(vec![32, 4])),
    ]);
    write_safetensors(&p, &tensors, None).unwrap();
    let e = read_lora(&p, Some(&unet_known())).unwrap_err().to_string();
    assert!(e.contains(k), "{e}");
    // Mismatched ranks.
    let p = dir.path().join("rank.safetensors");
    let k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q";
    let tensors = BTreeMap::from([
        (format!("{k}.lora_down.weight"), t(vec![4, 64])),
        (format!("{k}.lora_up.weight"), t(vec![64, 8])),
    ]);
    write_safetensors(&p, &tensors, None).unwrap();
    let e = read_lora(&p, None).unwrap_err().to_string();
    assert!(e.contains(&format!("{k}.lora_up.weight")), "{e}");
    // Not a LoRA at all.
    let p = dir.path().join("other.safetensors");
    write_safetensors(
        &p,
        &BTreeMap::from([("weight".to_string(), t(vec![2]))]),
        None,
    )
    .unwrap();
    let e = read_lora(&p, None).unwrap_err().to_string();
    assert!(e.contains("`weight`"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Torch checkpoint archive

use sdpipe::formats::torch_pickle::{PyValue, parse_torch, read_torch, torch_bytes, write_torch};

fn t(shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
    HostTensor::new(shape, data).unwrap()
}

#[test]
fn torch_archive_round_trip() {
    let value = PyValue::Dict(vec![
        (
            PyValue::Int(768),
            PyValue::Tuple(vec![
                PyValue::OrderedDict(vec![
                    (
                        PyValue::str("linear.0.weight"),
                        PyValue::Tensor(t(vec![2, 3], vec![1.0, -2.5, 3.0, 4.0, 5.0, 6.0])),
                    ),
                    (
                        PyValue::str("linear.0.bias"),
                        PyValue::Tensor(t(vec![2], vec![0.5, f32::MIN_POSITIVE])),
                    ),
                ]),
                PyValue::OrderedDict(vec![]),
            ]),
        ),
        (
            PyValue::str("scalar"),
            PyValue::Tensor(t(vec![], vec![7.0])),
        ),
        (
            PyValue::str("empty"),
            PyValue::Tensor(t(vec![0, 4], vec![])),
        ),
        (
            PyValue::str("ints"),
            PyValue::List(vec![
                PyValue::Int(0),
                PyValue::Int(255),
                PyValue::Int(256),
                PyValue::Int(65535),
                PyValue::Int(65536),
                PyValue::Int(-1),
                PyValue::Int(i32::MIN as i64),
                PyValue::Int(1 << 40),
                PyValue::Int(-(1 << 40)),
                PyValue::Int(i64::MAX),
                PyValue::Int(i64::MIN),
            ]),
        ),
        (PyValue::str("f"), PyValue::Float(-0.1)),
        (
            PyValue::str("flags"),
            PyValue::Tuple(vec![
                PyValue::Bool(true),
                PyValue::Bool(false),
                PyValue::None,
            ]),
        ),
        (
            PyValue::str("tuples"),
            PyValue::List(vec![
                PyValue::Tuple(vec![]),
                PyValue::Tuple(vec![PyValue::Int(1)]),
                PyValue::Tuple(vec![
                    PyValue::Int(1),
                    PyValue::Int(2),
                    PyValue::Int(3),
                    PyValue::Int(4),
                ]),
            ]),
        ),
        (PyValue::str("unicode ✓"), PyValue::str("naïve")),
        (
            PyValue::str("nested"),
            PyValue::Dict(vec![(PyValue::str("list"), PyValue::List(vec![]))]),
        ),
    ]);
    let bytes = torch_bytes(&value).unwrap();
    assert_eq!(parse_torch(&bytes).unwrap(), value);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.pt");
    write_torch(&p, &value).unwrap();
    assert_eq!(read_torch(&p).unwrap(), value);
    // Corrupt archives are errors, not panics.
    for cut in [10, bytes.len() / 2, bytes.len() - 5] {
        assert!(parse_torch(&bytes[..cut]).is_err());
    }
    assert!(
        parse_torch(b"\x80\x02}q\x00.")
            .unwrap_err()
            .contains("legacy")
    );
}

/// `tests/fixtures/torch/torch_saved.pt` was written by torch 2.15 (CPU):
/// ```python
/// sd = OrderedDict([("linear.0.weight", torch.arange(6.).reshape(2, 3)), ("linear.0.bias", torch.tensor([1.5, -2.0]))])
/// torch.save({768: (sd, sd), "step": 5, "name": "x", "f": 0.5, "n": None, "b": True, "l": [1, 2],
///             "big": 2**40, "neg": -3, "t": torch.arange(12.).reshape(3, 4).t(), "sl": torch.arange(10.)[3:7],
///             "h": torch.tensor([1.0, 2.0], dtype=torch.float16), "p": torch.nn.Parameter(torch.ones(2)),
///             "scalar": torch.tensor(3.25)}, "torch_saved.pt")
/// ```
#[test]
fn torch_archive_reads_a_torch_saved_file() {
    let v = read_torch(&fixture("torch/torch_saved.pt")).unwrap();
    let (k, sds) = &v.dict_items().unwrap()[0];
    assert_eq!(*k, PyValue::Int(768));
    let sds = sds.as_seq().unwrap();
    assert_eq!(sds[0], sds[1]); // the same state dict, referenced twice through the memo
    assert!(matches!(sds[0], PyValue::OrderedDict(_)));
    assert_eq!(
        sds[0].get("linear.0.weight").unwrap().as_tensor().unwrap(),
        &t(vec![2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    );
    assert_eq!(
        sds[0].get("linear.0.bias").unwrap().as_tensor().unwrap(),
        &t(vec![2], vec![1.5, -2.0])
    );
    assert_eq!(v.get("step").unwrap().as_int(), Some(5));
    assert_eq!(v.get("name").unwrap().as_str(), Some("x"));
    assert_eq!(v.get("f").unwrap().as_f64(), Some(0.5));
    assert_eq!(v.get("n"), Some(&PyValue::None));
    assert_eq!(v.get("b").unwrap().as_bool(), Some(true));
    assert_eq!(
        v.get("l"),
        Some(&PyValue::List(vec![PyValue::Int(1), PyValue::Int(2)]))
    );
    assert_eq!(v.get("big").unwrap().as_int(), Some(1 << 40));
    assert_eq!(v.get("neg").unwrap().as_int(), Some(-3));
    // A transposed (strided) view and an offset slice come out contiguous.
    let tr: Vec<f32> = (0..4)
        .flat_map(|c| (0..3).map(move |r| (r * 4 + c) as f32))
        .collect();
    assert_eq!(v.get("t").unwrap().as_tensor().unwrap(), &t(vec![4, 3], tr));
    assert_eq!(
        v.get("sl").unwrap().as_tensor().unwrap(),
        &t(vec![4], vec![3.0, 4.0, 5.0, 6.0])
    );
    assert_eq!(
        v.get("h").unwrap().as_tensor().unwrap(),
        &t(vec![2], vec![1.0, 2.0])
    );
    assert_eq!(
        v.get("p").unwrap().as_tensor().unwrap(),
        &t(vec![2], vec![1.0, 1.0])
    );
    assert_eq!(
        v.get("scalar").unwrap().as_tensor().unwrap(),
        &t(vec![], vec![3.25])
    );
}

// ---------------------------------------------------------------------------------------------
// Textual-inversion embeddings

use sdpipe::formats::embedding::{
    Embedding, EmbeddingFormat, read_embedding, write_a1111_pt, write_a1111_safetensors,
    write_diffusers,
};

#[test]
fn embeddings_a1111_and_diffusers_files_agree_with_golden() {
    let golden = read_safetensors(&fixture("goldens/textual_inversion.safetensors")).unwrap();
    let (a, fa) =
        read_embedding(&fixture("textual_inversion/ti_sks_a1111.safetensors"), None).unwrap();
    let (d, fd) = read_embedding(
        &fixture("textual_inversion/ti_sks_diffusers.safetensors"),
        None,
    )
    .unwrap();
    assert_eq!(fa, EmbeddingFormat::A1111Safetensors);
    assert_eq!(fd, EmbeddingFormat::Diffusers);
    assert_eq!(a.token, "ti_sks_a1111"); // A1111 names an embedding after its file
    assert_eq!(d.token, "<sks>");
    assert_eq!(a.vectors, d.vectors);
    assert_eq!(a.vectors, golden.tensors["emb_sks"]);
    assert_eq!((a.num_vectors(), a.dim()), (2, 32));
    let (c, _) = read_embedding(
        &fixture("textual_inversion/ti_cat_toy_diffusers.safetensors"),
        None,
    )
    .unwrap();
    assert_eq!(c.token, "<cat-toy>");
    assert_eq!(c.vectors.shape, vec![1, 32]);
    assert_eq!(c.vectors.data, golden.tensors["emb_cat_toy"].data);
    let (named, _) = read_embedding(
        &fixture("textual_inversion/ti_sks_a1111.safetensors"),
        Some("sks"),
    )
    .unwrap();
    assert_eq!(named.token, "sks");
}

/// `tests/fixtures/textual_inversion/a1111_emb.pt` was written by torch 2.15 in A1111's layout:
/// `{"string_to_token": {"*": 265}, "string_to_param": {"*": Parameter(linspace(-1, 1, 64).reshape(2, 32))},
///   "name": "sks", "step": 100, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "tiny"}`.
#[test]
fn embeddings_read_a1111_pt() {
    let (e, f) = read_embedding(&fixture("textual_inversion/a1111_emb.pt"), None).unwrap();
    assert_eq!(f, EmbeddingFormat::A1111Torch);
    assert_eq!(e.token, "a1111_emb");
    assert_eq!(e.vectors.shape, vec![2, 32]);
    for (i, v) in e.vectors.data.iter().enumerate() {
        let want = -1.0 + 2.0 * i as f64 / 63.0;
        assert!((*v as f64 - want).abs() < 1e-6, "{i}: {v} vs {want}");
    }
    assert_eq!(e.step, Some(100));
    assert_eq!(e.sd_checkpoint.as_deref(), Some("abcd1234"));
    assert_eq!(e.sd_checkpoint_name.as_deref(), Some("tiny"));
}

#[test]
fn embeddings_write_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let emb = Embedding {
        token: "my-style".into(),
        vectors: t(vec![3, 4], (0..12).map(|i| i as f32 * 0.25 - 1.0).collect()),
        step: Some(1500),
        sd_checkpoint: Some("0123abcd".into()),
        sd_checkpoint_name: Some("v1-5".into()),
    };
    let p = dir.path().join("my-style.safetensors");
    write_a1111_safetensors(&p, &emb).unwrap();
    let raw = read_safetensors(&p).unwrap();
    assert_eq!(raw.tensors.keys().collect::<Vec<_>>(), vec!["emb_params"]);
    assert_eq!(raw.metadata["name"], "my-style");
    assert_eq!(raw.metadata["step"], "1500");
    let (back, _) = read_embedding(&p, None).unwrap();
    assert_eq!(back, emb);

    let p = dir.path().join("learned_embeds.safetensors");
    write_diffusers(&p, &emb).unwrap();
    let (back, f) = read_embedding(&p, None).unwrap();
    assert_eq!(f, EmbeddingFormat::Diffusers);
    assert_eq!(
        (back.token.as_str(), &back.vectors),
        ("my-style", &emb.vectors)
    );

    let p = dir.path().join("my-style.pt");
    write_a1111_pt(&p, &emb).unwrap();
    let (back, f) = read_embedding(&p, None).unwrap();
    assert_eq!(f, EmbeddingFormat::A1111Torch);
    assert_eq!(back, emb);
}

#[test]
fn embeddings_bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("two.safetensors");
    let two = BTreeMap::from([
        ("a".to_string(), t(vec![2], vec![0.0; 2])),
        ("b".to_string(), t(vec![2], vec![0.0; 2])),
    ]);
    write_safetensors(&p, &two, None).unwrap();
    let e = read_embedding(&p, None).unwrap_err().to_string();
    assert!(
        e.contains("two.safetensors") && e.contains("emb_params"),
        "{e}"
    );
    let p = dir.path().join("cube.safetensors");
    write_safetensors(
        &p,
        &BTreeMap::from([("emb_params".to_string(), t(vec![1, 1, 2], vec![0.0; 2]))]),
        None,
    )
    .unwrap();
    let e = read_embedding(&p, None).unwrap_err().to_string();
    assert!(e.contains("emb_params") && e.contains("[1, 1, 2]"), "{e}");
    let p = dir.path().join("sdxl.safetensors");
    write_safetensors(
        &p,
        &BTreeMap::from([
            ("clip_l".to_string(), t(vec![1, 2], vec![0.0; 2])),
            ("clip_g".to_string(), t(vec![1, 2], vec![0.0; 2])),
        ]),
        None,
    )
    .unwrap();
    assert!(
        read_embedding(&p, None)
            .unwrap_err()
            .to_string()
            .contains("SDXL")
    );
}

// ---------------------------------------------------------------------------------------------
// Hypernetworks

use sdpipe::formats::hypernetwork::{
    HyperLinear, Hypernetwork, HypernetworkConfig, HypernetworkModule, SeqLayer,
    parse_dropout_structure, read_hypernetwork, sequential_layout, write_hypernetwork_pt,
    write_hypernetwork_safetensors,
};

fn param_indices(dim: usize, c: &HypernetworkConfig) -> Vec<usize> {
    sequential_layout(dim, c)
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l, SeqLayer::Linear { .. } | SeqLayer::LayerNorm { .. }))
        .map(|(i, _)| i)
        .collect()
}

fn cfg(
    ls: &[f64],
    act: &str,
    ln: bool,
    activate_output: bool,
    dropout: bool,
    last: bool,
) -> HypernetworkConfig {
    HypernetworkConfig {
        layer_structure: ls.to_vec(),
        activation_func: Some(act.to_string()),
        is_layer_norm: ln,
        activate_output,
        use_dropout: dropout,
        last_layer_dropout: last,
        ..Default::default()
    }
}

/// Expected indices worked out from A1111's `HypernetworkModule.__init__`: per linear i, append
/// Linear; the activation unless it is `linear` or (i is the last linear and not
/// activate_output); LayerNorm if enabled; Dropout if dropout_structure[i + 1] > 0.
#[test]
fn hypernetwork_sequential_indices_follow_a1111() {
    // Default: Linear, Linear.
    assert_eq!(
        param_indices(768, &HypernetworkConfig::default()),
        vec![0, 1]
    );
    // relu: L0 ReLU1 L2.
    assert_eq!(
        param_indices(
            768,
            &cfg(&[1.0, 2.0, 1.0], "relu", false, false, false, false)
        ),
        vec![0, 2]
    );
    // relu + activate_output: L0 ReLU1 L2 ReLU3.
    let c = cfg(&[1.0, 2.0, 1.0], "relu", false, true, false, false);
    assert_eq!(sequential_layout(768, &c).unwrap().len(), 4);
    assert_eq!(param_indices(768, &c), vec![0, 2]);
    // relu + layer norm: L0 ReLU1 LN2 L3 LN4.
    assert_eq!(
        param_indices(
            768,
            &cfg(&[1.0, 2.0, 1.0], "relu", true, false, false, false)
        ),
        vec![0, 2, 3, 4]
    );
    // Dropout [0, .3, .3, 0]: L0 A1 D2 L3 A4 D5 L6.
    assert_eq!(
        param_indices(
            768,
            &cfg(&[1.0, 2.0, 2.0, 1.0], "relu", false, false, true, true)
        ),
        vec![0, 3, 6]
    );
    // Dropout [0, .3, 0, 0]: L0 A1 D2 L3 A4 L5.
    assert_eq!(
        param_indices(
            768,
            &cfg(&[1.0, 2.0, 2.0, 1.0], "relu", false, false, true, false)
        ),
        vec![0, 3, 5]
    );
    // linear activation + dropout + layer norm, 5 entries: [0, .3, .3, .3, 0]: L0 LN1 D2 L3 LN4 D5 L6 LN7 D8 L9 LN10.
    assert_eq!(
        param_indices(
            320,
            &cfg(
                &[1.0, 2.0, 4.0, 2.0, 1.0],
                "linear",
                true,
                false,
                true,
                true
            )
        ),
        vec![0, 1, 3, 4, 6, 7, 9, 10]
    );
    // [1, 1] with last-layer dropout: A1111's parse gives [0, 0.3, 0] → L0 D1.
    assert_eq!(
        parse_dropout_structure(&[1.0, 1.0], true, true),
        vec![0.0, 0.3, 0.0]
    );
    let layout =
        sequential_layout(640, &cfg(&[1.0, 1.0], "tanh", false, false, true, true)).unwrap();
    assert_eq!(
        layout,
        vec![
            SeqLayer::Linear {
                in_features: 640,
                out_features: 640
            },
            SeqLayer::Dropout { p: 0.3 }
        ]
    );
    // Widths are Python's int(dim * m).
    let layout = sequential_layout(
        320,
        &cfg(&[1.0, 1.33, 1.0], "linear", false, false, false, false),
    )
    .unwrap();
    assert_eq!(
        layout[0],
        SeqLayer::Linear {
            in_features: 320,
            out_features: 425
        }
    );
    // A1111's asserts.
    assert!(sequential_layout(768, &cfg(&[2.0, 1.0], "relu", false, false, false, false)).is_err());
    assert!(sequential_layout(768, &cfg(&[1.0, 2.0], "relu", false, false, false, false)).is_err());
}

fn sample_hypernetwork(config: HypernetworkConfig, widths: &[usize]) -> Hypernetwork {
    let mut seed = 0.0f32;
    let mut t = |shape: Vec<usize>| {
        seed += 1.0;
        let n = shape.iter().product::<usize>();
        let s = seed;
        HostTensor::new(
            shape,
            (0..n)
                .map(|i| ((i as f32 + s) * 0.71).sin() * 0.01)
                .collect(),
        )
        .unwrap()
    };
    let mut modules = BTreeMap::new();
    for &w in widths {
        let ls = &config.layer_structure;
        let mut module = || HypernetworkModule {
            layers: (0..ls.len() - 1)
                .map(|i| {
                    let (a, b) = ((w as f64 * ls[i]) as usize, (w as f64 * ls[i + 1]) as usize);
                    HyperLinear {
                        weight: t(vec![b, a]),
                        bias: t(vec![b]),
                        layer_norm: config.is_layer_norm.then(|| (t(vec![b]), t(vec![b]))),
                    }
                })
                .collect(),
        };
        let k = module();
        let v = module();
        modules.insert(w, (k, v));
    }
    Hypernetwork {
        name: "my_hn".into(),
        step: 1234,
        sd_checkpoint: Some("deadbeef".into()),
        sd_checkpoint_name: Some("v1-5-pruned".into()),
        optional_info: Some("made by sdpipe".into()),
        config,
        modules,
    }
}

#[test]
fn hypernetwork_round_trips_through_pt_and_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    for config in [
        HypernetworkConfig::default(),
        cfg(&[1.0, 2.0, 2.0, 1.0], "swish", true, true, true, false),
        cfg(&[1.0, 1.5, 1.0], "leakyrelu", true, false, true, true),
    ] {
        let mut hn = sample_hypernetwork(config, &[8, 12]);
        // Written files always carry the effective dropout structure.
        hn.config.dropout_structure = Some(hn.config.effective_dropout_structure());
        hn.config.last_layer_dropout = {
            let d = hn.config.dropout_structure.as_ref().unwrap();
            d[d.len() - 2] != 0.0
        };
        let p = dir.path().join("my_hn.pt");
        write_hypernetwork_pt(&p, &hn).unwrap();
        assert_eq!(read_hypernetwork(&p).unwrap(), hn);
        let p = dir.path().join("my_hn.safetensors");
        write_hypernetwork_safetensors(&p, &hn).unwrap();
        assert_eq!(read_hypernetwork(&p).unwrap(), hn);
    }
    let hn = sample_hypernetwork(
        cfg(&[1.0, 2.0, 1.0], "relu", true, false, false, false),
        &[768],
    );
    let (tensors, meta) = hn.to_safetensors().unwrap();
    let keys: Vec<&str> = tensors
        .keys()
        .map(String::as_str)
        .filter(|k| k.starts_with("768.k."))
        .collect();
    assert_eq!(
        keys,
        [
            "768.k.linear.0.bias",
            "768.k.linear.0.weight",
            "768.k.linear.2.bias",
            "768.k.linear.2.weight",
            "768.k.linear.3.bias",
            "768.k.linear.3.weight",
            "768.k.linear.4.bias",
            "768.k.linear.4.weight"
        ]
    );
    assert_eq!(meta["layer_structure"], "[1.0,2.0,1.0]");
    assert_eq!(meta["activation_func"], "relu");
    assert_eq!(meta["is_layer_norm"], "true");
    // The .pt dict has A1111's keys, widths as int keys and (k, v) tuples of OrderedDicts.
    let v = hn.to_pyvalue().unwrap();
    let keys: Vec<String> = v
        .dict_items()
        .unwrap()
        .iter()
        .map(|(k, _)| match k {
            PyValue::Int(i) => i.to_string(),
            PyValue::Str(s) => s.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        keys,
        [
            "768",
            "step",
            "name",
            "layer_structure",
            "activation_func",
            "is_layer_norm",
            "weight_initialization",
            "sd_checkpoint",
            "sd_checkpoint_name",
            "activate_output",
            "use_dropout",
            "dropout_structure",
            "last_layer_dropout",
            "optional_info"
        ]
    );
}

/// `tests/fixtures/hypernetwork/a1111_hn.pt` was written by torch 2.15 with real `nn.Sequential`
/// modules built as A1111 builds them (`make_a1111_hn.py` beside it): layer_structure
/// `[1, 2, 2, 1]`, relu, layer norm, dropout structure `[0, 0.3, 0.3, 0]`, widths 8 and 16.
#[test]
fn hypernetwork_reads_a_torch_written_a1111_file() {
    let hn = read_hypernetwork(&fixture("hypernetwork/a1111_hn.pt")).unwrap();
    assert_eq!(hn.name, "a1111_hn");
    assert_eq!(hn.step, 42);
    assert_eq!(hn.config.layer_structure, vec![1.0, 2.0, 2.0, 1.0]);
    assert_eq!(hn.config.activation_func.as_deref(), Some("relu"));
    assert!(hn.config.is_layer_norm && hn.config.use_dropout && !hn.config.activate_output);
    assert_eq!(hn.sd_checkpoint.as_deref(), Some("1234abcd"));
    assert_eq!(hn.optional_info, None);
    assert_eq!(hn.modules.keys().copied().collect::<Vec<_>>(), vec![8, 16]);
    let (k, _) = &hn.modules[&16];
    assert_eq!(k.layers.len(), 3);
    assert_eq!(k.layers[1].weight.shape, vec![32, 32]);
    assert!(k.layers.iter().all(|l| l.layer_norm.is_some()));
    // Written back, it reads the same.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("again.pt");
    write_hypernetwork_pt(&p, &hn).unwrap();
    assert_eq!(
        read_hypernetwork(&p).unwrap(),
        Hypernetwork {
            name: "a1111_hn".into(),
            ..hn.clone()
        }
    );
    // A configuration that does not fit the tensors is an error naming the tensor.
    let mut bad = hn.to_pyvalue().unwrap();
    if let PyValue::Dict(items) = &mut bad {
        for (k, v) in items.iter_mut() {
            if *k == PyValue::str("is_layer_norm") {
                *v = PyValue::Bool(false);
            }
        }
    }
    let e = Hypernetwork::from_pyvalue(&bad, "x").unwrap_err();
    assert!(e.contains("linear."), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Odds and ends

#[test]
fn host_tensor_dfdx_round_trip() {
    use dfdx::prelude::*;
    let dev = Cpu::default();
    let h = t(vec![2, 1, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let d: Tensor<(usize, usize, usize), f32, Cpu> = h.to_tensor(&dev).unwrap();
    assert_eq!(d.shape().concrete(), [2, 1, 3]);
    assert_eq!(HostTensor::from_tensor(&d), h);
    assert!(h.to_tensor::<(usize, usize), _>(&dev).is_none());
    let c: Tensor<Rank3<2, 1, 3>, f32, Cpu> = h.to_tensor(&dev).unwrap();
    assert_eq!(c.array(), [[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]]);
    assert!(h.to_tensor::<Rank3<2, 2, 3>, _>(&dev).is_none());
}

#[test]
fn lora_diffusers_text_encoder_and_peft_alpha_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let z = |s: Vec<usize>| HostTensor::zeros(s);
    // diffusers file with UNet and text-encoder modules and per-component alphas.
    let p = dir.path().join("pytorch_lora_weights.safetensors");
    let te = "text_encoder.text_model.encoder.layers.1.self_attn.out_proj";
    let un = "unet.up_blocks.1.attentions.0.proj_in";
    let tensors = BTreeMap::from([
        (format!("{te}.lora_A.weight"), z(vec![2, 32])),
        (format!("{te}.lora_B.weight"), z(vec![32, 2])),
        (format!("{un}.lora_A.weight"), z(vec![8, 32, 1, 1])),
        (format!("{un}.lora_B.weight"), z(vec![32, 8, 1, 1])),
    ]);
    let meta =
        serde_json::json!({"unet.lora_alpha": 4.0, "text_encoder.lora_alpha": 1.0}).to_string();
    let meta = std::collections::HashMap::from([("lora_adapter_metadata".to_string(), meta)]);
    write_safetensors(&p, &tensors, Some(meta)).unwrap();
    let (net, f) = read_lora(dir.path(), None).unwrap();
    assert_eq!(f, LoraFormat::Diffusers);
    let m = &net.text_encoder["text_model.encoder.layers.1.self_attn.out_proj"];
    assert_eq!((m.rank(), m.alpha()), (2, 1.0));
    let m = &net.unet["up_blocks.1.attentions.0.proj_in"];
    assert_eq!(
        (
            m.rank(),
            m.alpha(),
            m.is_conv(),
            m.as_lora().unwrap().up.shape.clone()
        ),
        (8, 4.0, true, vec![32, 8])
    );
    assert_eq!(m.weight_shape(), vec![32, 32, 1, 1]);
    // Kohya round trip keeps the text encoder under lora_te_ and the conv shapes.
    let k = dir.path().join("k.safetensors");
    write_kohya(&k, &net, &KohyaMetadata::default()).unwrap();
    assert_eq!(read_lora(&k, None).unwrap().0, net);

    // PEFT dir with an alpha_pattern override.
    let peft = dir.path().join("peft");
    std::fs::create_dir(&peft).unwrap();
    let tensors = BTreeMap::from([
        (
            "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
                .to_string(),
            z(vec![4, 32]),
        ),
        (
            "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"
                .to_string(),
            z(vec![64, 4]),
        ),
        (
            "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight"
                .to_string(),
            z(vec![4, 32]),
        ),
        (
            "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight"
                .to_string(),
            z(vec![64, 4]),
        ),
    ]);
    write_safetensors(&peft.join("adapter_model.safetensors"), &tensors, None).unwrap();
    std::fs::write(
        peft.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn2.to_v": 2}}"#,
    )
    .unwrap();
    let (net, f) = read_lora(&peft, Some(&unet_known())).unwrap();
    assert_eq!(f, LoraFormat::Peft);
    assert_eq!(
        net.unet["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].alpha(),
        8.0
    );
    assert_eq!(
        net.unet["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"].alpha(),
        2.0
    );
}

#[test]
fn torch_archive_records_are_aligned_and_checksummed() {
    let bytes = torch_bytes(&PyValue::Tensor(t(vec![3], vec![1.0, 2.0, 3.0]))).unwrap();
    // Walk the local headers: every record's data starts on a 64-byte boundary and its CRC holds.
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]) as usize;
    let u32_at = |i: usize| {
        u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize
    };
    let mut at = 0;
    let mut names = Vec::new();
    while u32_at(at) == 0x0403_4b50 {
        let size = u32_at(at + 18);
        let (nl, el) = (u16_at(at + 26), u16_at(at + 28));
        let start = at + 30 + nl + el;
        assert_eq!(start % 64, 0);
        assert_eq!(
            crc32fast::hash(&bytes[start..start + size]) as usize,
            u32_at(at + 14)
        );
        names.push(String::from_utf8(bytes[at + 30..at + 30 + nl].to_vec()).unwrap());
        at = start + size;
    }
    assert_eq!(
        names,
        [
            "archive/data.pkl",
            "archive/byteorder",
            "archive/data/0",
            "archive/version"
        ]
    );
}

/// `tests/fixtures/torch/torch_views.pt` (torch 2.15): `base = torch.arange(6.)`;
/// `{"expanded": tensor([2.5]).expand(4), "long": tensor([[1, -2], [3, 4]]), "view_a": base[:3],
///   "view_b": base[3:].reshape(1, 3), "bf16": tensor([1.5, -0.25], dtype=bfloat16)}` — a
/// stride-0 tensor, an integer storage, two views sharing one storage, a bf16 storage.
#[test]
fn torch_archive_reads_views_and_other_storages() {
    let v = read_torch(&fixture("torch/torch_views.pt")).unwrap();
    let get = |k: &str| v.get(k).unwrap().as_tensor().unwrap().clone();
    assert_eq!(get("expanded"), t(vec![4], vec![2.5; 4]));
    assert_eq!(get("long"), t(vec![2, 2], vec![1.0, -2.0, 3.0, 4.0]));
    assert_eq!(get("view_a"), t(vec![3], vec![0.0, 1.0, 2.0]));
    assert_eq!(get("view_b"), t(vec![1, 3], vec![3.0, 4.0, 5.0]));
    assert_eq!(get("bf16"), t(vec![2], vec![1.5, -0.25]));
}

#[test]
fn hypernetwork_new_initialises_as_a1111() {
    let std_of = |d: &[f32]| {
        let n = d.len() as f64;
        let mean = d.iter().map(|&x| x as f64).sum::<f64>() / n;
        (d.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
    };
    let c = cfg(&[1.0, 2.0, 1.0], "relu", true, false, false, false);
    let hn = Hypernetwork::new("hn", c.clone(), &[768, 320], 7).unwrap();
    assert_eq!(
        hn.modules.keys().copied().collect::<Vec<_>>(),
        vec![320, 768]
    );
    let (k, v) = &hn.modules[&768];
    assert_ne!(k, v);
    assert_eq!(k.layers[0].weight.shape, vec![1536, 768]);
    let s = std_of(&k.layers[0].weight.data);
    assert!((s - 0.01).abs() < 0.0002, "{s}");
    assert!(
        k.layers
            .iter()
            .all(|l| l.bias.data.iter().all(|&b| b == 0.0))
    );
    let (lnw, lnb) = k.layers[1].layer_norm.as_ref().unwrap();
    assert!((std_of(&lnw.data) - 0.01).abs() < 0.002);
    assert!(lnb.data.iter().all(|&b| b == 0.0));
    // Its state dict is what A1111 expects, and it is deterministic in the seed.
    assert_eq!(k.state_dict(768, &c).unwrap().len(), 8);
    assert_eq!(
        Hypernetwork::new("hn", c.clone(), &[768, 320], 7).unwrap(),
        hn
    );
    assert_ne!(
        Hypernetwork::new("hn", c.clone(), &[768, 320], 8).unwrap(),
        hn
    );
    // Xavier uniform stays within its bound sqrt(6 / (in + out)); Kaiming normal has std sqrt(2 / in).
    let x = Hypernetwork::new(
        "x",
        HypernetworkConfig {
            weight_initialization: "XavierUniform".into(),
            ..c.clone()
        },
        &[64],
        1,
    )
    .unwrap();
    let w = &x.modules[&64].0.layers[0].weight.data;
    let bound = (6.0f32 / (64.0 + 128.0)).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > 0.9 * bound));
    let kn = Hypernetwork::new(
        "k",
        HypernetworkConfig {
            weight_initialization: "KaimingNormal".into(),
            ..c.clone()
        },
        &[256],
        1,
    )
    .unwrap();
    let s = std_of(&kn.modules[&256].0.layers[0].weight.data);
    assert!((s - (2.0f64 / 256.0).sqrt()).abs() < 0.003, "{s}");
    let e = Hypernetwork::new(
        "e",
        HypernetworkConfig {
            weight_initialization: "Orthogonal".into(),
            ..c
        },
        &[8],
        1,
    )
    .unwrap_err();
    assert!(e.contains("Orthogonal"), "{e}");
}

#[test]
fn lora_init_is_identity_with_bounded_down() {
    let m = LoraModule::init(&[64, 32], 4, 2.0, 3).unwrap();
    assert_eq!(
        (m.down.shape.clone(), m.up.shape.clone(), m.scale()),
        (vec![4, 32], vec![64, 4], 0.5)
    );
    assert!(m.up.data.iter().all(|&v| v == 0.0));
    let bound = 1.0 / 32f32.sqrt();
    assert!(
        m.down.data.iter().all(|v| v.abs() <= bound)
            && m.down.data.iter().any(|v| v.abs() > 0.8 * bound)
    );
    assert!(m.delta(1.0).data.iter().all(|&v| v == 0.0));
    assert_eq!(LoraModule::init(&[64, 32], 4, 2.0, 3).unwrap(), m);
    let c = LoraModule::init(&[8, 4, 3, 3], 2, 2.0, 1).unwrap();
    assert_eq!(
        (c.down.shape.clone(), c.weight_shape()),
        (vec![2, 4, 3, 3], vec![8, 4, 3, 3])
    );
    assert!(LoraModule::init(&[8], 2, 1.0, 1).is_err());
}
