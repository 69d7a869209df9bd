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
        assert_eq!(m.alpha, 2.0);
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
    assert!(net.unet.values().all(|m| m.alpha == 4.0));
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
        },
    );
    net.unet.insert(
        "up_blocks.1.resnets.0.conv_shortcut".into(),
        LoraModule {
            down: t(vec![2, 6, 3, 3], 0.3),
            up: t(vec![4, 2], 0.4),
            alpha: 2.0,
        },
    );
    net.unet.insert(
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj".into(),
        LoraModule {
            down: t(vec![3, 8], 0.5),
            up: t(vec![16, 3], 0.6),
            alpha: 3.0,
        },
    );
    net.text_encoder.insert(
        "text_model.encoder.layers.11.self_attn.q_proj".into(),
        LoraModule {
            down: t(vec![3, 7], 0.7),
            up: t(vec![7, 3], 0.8),
            alpha: 1.0,
        },
    );
    net.text_encoder.insert(
        "text_model.encoder.layers.0.mlp.fc1".into(),
        LoraModule {
            down: t(vec![3, 7], 0.9),
            up: t(vec![9, 3], 1.0),
            alpha: 3.0,
        },
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
