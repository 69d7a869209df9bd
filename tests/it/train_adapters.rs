//! The LoRA family beyond LoRA on the tiny fixture model: `method = "locon" | "loha" | "lokr"
//! | "dora"` train, lower the loss, write the keys kohya/LyCORIS write (read back as the same
//! kind), change the grid, merge into a checkpoint, and resume bit-identically after a kill.

use sdpipe::formats::lora::{ModuleKind, read_lora};
use sdpipe::formats::read_safetensors;

use crate::common::{PipelineToml, Project, killed_and_resumed};

const METHODS: [&str; 4] = ["locon", "loha", "lokr", "dora"];

fn pipeline(methods: &[&str], steps: i64) -> PipelineToml {
    PipelineToml::tiny_latents(5)
        .merge(toml::toml! {
            [stage.train]
            kind = "train"
            needs = ["latents"]
            steps = steps
            lr = 1e-2
            checkpoint_every = 5

            [stage.train.lora]
            rank = 4
            alpha = 4
        })
        .set("stage.train.matrix.method", methods.to_vec())
}

#[test]
fn every_adapter_method_trains_writes_its_format_and_changes_the_grid() {
    let text = pipeline(&METHODS, 20)
        .merge(toml::toml! {
            [stage.merged]
            kind = "merge"
            needs = ["train@method=loha", "train@method=dora"]
            mode = "lora_into_checkpoint"
            loras = ["train@method=loha", "train@method=dora"]
        })
        .tiny_grid("grid", &["train", "merged"]);
    let p = Project::new(text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let base = image::open(p.path("outputs/t/grid/images/base/00-1.png"))
        .unwrap()
        .to_rgb8();
    for (method, kind, key, module, args) in [
        (
            "locon",
            ModuleKind::Lora,
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
            "networks.lora",
            r#""conv_dim":"4""#,
        ),
        (
            "loha",
            ModuleKind::Hada,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_b",
            "lycoris.kohya",
            r#""algo":"loha""#,
        ),
        (
            "lokr",
            ModuleKind::Kron,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1",
            "lycoris.kohya",
            r#""algo":"lokr""#,
        ),
        (
            "dora",
            ModuleKind::Dora,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale",
            "lycoris.kohya",
            r#""dora_wd":"True""#,
        ),
    ] {
        let stage = format!("train@method={method}");
        let stats = p.stats(&stage);
        let (before, after) = (
            stats["eval_loss_before"].as_f64().unwrap(),
            stats["eval_loss_after"].as_f64().unwrap(),
        );
        assert!(after < before, "{method} did not learn: {before} → {after}");
        let file = p.path(&format!("outputs/t/{stage}/lora.safetensors"));
        let st = read_safetensors(&file).unwrap();
        assert!(st.tensors.contains_key(key), "{method}: no `{key}`");
        assert_eq!(st.metadata["ss_network_module"], module, "{method}");
        assert!(st.metadata["ss_network_args"].contains(args), "{method}");
        let (net, _) = read_lora(&file, None).unwrap();
        assert!(net.kinds().iter().all(|k| *k == kind), "{method}");
        let params: usize = net.iter().map(|(_, _, m)| m.num_params()).sum();
        assert_eq!(stats["trainable_params"], params, "{method}");
        let row = image::open(p.path(&format!("outputs/t/grid/images/{stage}/00-1.png")))
            .unwrap()
            .to_rgb8();
        assert_ne!(
            base.as_raw(),
            row.as_raw(),
            "{method} leaves the image as it was"
        );
    }
    // LoCon adapts the convolutions beside the attention; DoRA's magnitude is per input column
    let (locon, _) = read_lora(
        &p.path("outputs/t/train@method=locon/lora.safetensors"),
        None,
    )
    .unwrap();
    assert!(locon.unet.values().any(|m| m.is_conv()));
    let dora = read_safetensors(&p.path("outputs/t/train@method=dora/lora.safetensors")).unwrap();
    let scale = &dora.tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"];
    assert_eq!(scale.shape, vec![1, 32]);
    // merged into a checkpoint, LoHa + DoRA change the image too
    let merged = image::open(p.path("outputs/t/grid/images/merged/00-1.png"))
        .unwrap()
        .to_rgb8();
    assert_ne!(base.as_raw(), merged.as_raw());
}

#[test]
fn sample_lora_reproduces_each_kinds_grid_row() {
    let p = Project::new(pipeline(&["loha", "lokr", "dora"], 10).tiny_grid("grid", &["train"]));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let base = image::open(p.path("outputs/t/grid/images/base/00-1.png"))
        .unwrap()
        .to_rgb8();
    for method in ["loha", "lokr", "dora"] {
        let stage = format!("train@method={method}");
        let cell = image::open(p.path(&format!("outputs/t/grid/images/{stage}/00-1.png")))
            .unwrap()
            .to_rgb8();
        let lora = p.path(&format!("outputs/t/{stage}/lora.safetensors"));
        let img = p.sample_tiny_cell(&["--lora", lora.to_str().unwrap()]);
        let diff = |a: &image::RgbImage| {
            (img.as_raw().iter().zip(a.as_raw()))
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap()
        };
        assert!(
            diff(&cell) <= 2,
            "{method}: differs from its grid row by {}/255",
            diff(&cell)
        );
        assert!(
            diff(&base) > 2,
            "{method}: `sample --lora` left the image as it was"
        );
    }
}

#[test]
fn adapter_methods_resume_bit_identically_after_a_kill() {
    let methods = ["loha", "lokr", "dora"];
    let whole = Project::new(pipeline(&methods, 15));
    let run = whole.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let r = killed_and_resumed(pipeline(&methods, 15), 40);
    let resumed = methods.iter().any(|m| {
        r.stats(&format!("train@method={m}"))["resumed_from"]
            .as_u64()
            .is_some_and(|s| s > 0)
    });
    assert!(resumed, "no stage resumed from a checkpoint");
    for m in methods {
        let file = format!("outputs/t/train@method={m}/lora.safetensors");
        assert_eq!(
            std::fs::read(whole.path(&file)).unwrap(),
            std::fs::read(r.path(&file)).unwrap(),
            "{m}: the resumed run ends with other bytes than the uninterrupted one"
        );
    }
}

#[test]
fn lycoris_files_round_trip_and_unsupported_parts_are_named() {
    use sdpipe::formats::lora::{
        DoraModule, HadaModule, KnownModules, KohyaMetadata, KronModule, LoraNetwork,
        NetworkModule, write_kohya,
    };
    use sdpipe::formats::{HostTensor, write_safetensors};
    let dir = tempfile::tempdir().unwrap();
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let conv = "down_blocks.0.resnets.0.conv1";
    let te = "text_model.encoder.layers.0.self_attn.k_proj";
    let weight = HostTensor::new(vec![32, 32], (0..1024).map(|i| (i as f32).sin()).collect());
    let mut net = LoraNetwork::default();
    let hada = HadaModule::init(&[32, 32, 3, 3], 2, 1.0, 1).unwrap();
    net.unet.insert(conv.into(), NetworkModule::Hada(hada));
    let kron = KronModule::init(&[32, 32], 2, 2.0, -1, 2).unwrap();
    net.unet.insert(q.into(), NetworkModule::Kron(kron));
    let dora = DoraModule::init(&weight.unwrap(), 2, 2.0, 3).unwrap();
    net.text_encoder
        .insert(te.into(), NetworkModule::Dora(dora));
    let file = dir.path().join("n.safetensors");
    write_kohya(&file, &net, &KohyaMetadata::default()).unwrap();
    // with the model's shapes, a conv's 2-d factors regain their kernel axes
    let ckpt = sdpipe::diffusion::Checkpoint::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-sd"
    ))
    .unwrap();
    let known: KnownModules = sdpipe::merge::known_modules_of(&ckpt);
    let (back, _) = read_lora(&file, Some(&known)).unwrap();
    assert_eq!(back, net);

    // LyCORIS' Tucker factors are refused by name, with what to do
    let mut tensors = sdpipe::formats::lora::kohya_tensors(&net);
    let stem = "lora_unet_down_blocks_0_resnets_0_conv1";
    tensors.insert(
        format!("{stem}.hada_t1"),
        HostTensor::zeros(vec![2, 2, 3, 3]),
    );
    let tucker = dir.path().join("tucker.safetensors");
    write_safetensors(&tucker, &tensors, None).unwrap();
    let err = read_lora(&tucker, None).unwrap_err().to_string();
    assert!(
        err.contains(&format!("`{stem}.hada_t1`")) && err.contains("Tucker"),
        "{err}"
    );

    // what only plain LoRA supports says which module is not
    let err = sdpipe::merge::combine_loras(&[(&net, 1.0)], sdpipe::merge::CombineMethod::Concat)
        .unwrap_err()
        .to_string();
    assert!(err.contains("only plain LoRA"), "{err}");
}

#[test]
fn lycoris_keys_on_methods_without_them_are_refused_at_the_key() {
    let p = Project::new(pipeline(&["lokr"], 2));
    for (text, key, says) in [
        (
            pipeline(&["lora", "lokr"], 2).set("stage.train.lora.factor", 4),
            "lora.factor",
            "method = \"lora\" has none",
        ),
        (
            pipeline(&["lokr"], 2).set("stage.train.lora.factor", 0),
            "lora.factor",
            "neither -1 nor a positive factor",
        ),
        (
            pipeline(&["dora"], 2).set("stage.train.lora.dropout", 0.1),
            "lora.dropout",
            "full-size weight update",
        ),
    ] {
        p.write_pipeline(text);
        let run = p.sdpipe(&["plan", "p.toml"]);
        assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
        assert!(
            run.stderr.contains(key) && run.stderr.contains(says) && run.stderr.contains("p.toml:"),
            "{}",
            run.stderr
        );
    }
    // a factor LoKr can use changes the split
    p.write_pipeline(pipeline(&["lokr"], 2).set("stage.train.lora.factor", 2));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let st = read_safetensors(&p.path("outputs/t/train@method=lokr/lora.safetensors")).unwrap();
    let w1 =
        &st.tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1"];
    assert_eq!(
        w1.shape,
        vec![2, 2],
        "32 = 2 × 16 with factor 2 (4 × 8 by default)"
    );
}

#[test]
fn adapter_methods_train_the_text_encoder_too() {
    let text = pipeline(&["loha", "dora"], 4).set("stage.train.lora.text_encoder", true);
    let p = Project::new(text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    for (method, kind) in [("loha", ModuleKind::Hada), ("dora", ModuleKind::Dora)] {
        let file = p.path(&format!("outputs/t/train@method={method}/lora.safetensors"));
        let (net, _) = read_lora(&file, None).unwrap();
        assert!(
            !net.text_encoder.is_empty(),
            "{method}: no text-encoder modules"
        );
        assert!(
            net.text_encoder.values().all(|m| m.kind() == kind),
            "{method}"
        );
    }
}
