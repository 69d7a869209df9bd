//! Three steps of LoRA training on the tiny UNet against peft + torch (goldens/lora_training):
//! the loss of each step, the gradients of the first and the parameters after the third.

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use sdpipe::diffusion::Checkpoint;
use sdpipe::diffusion::schedulers::{Ddpm, SchedulerConfig};
use sdpipe::formats::lora::{LoraModule, LoraNetwork};
use sdpipe::formats::{HostTensor, read_safetensors};
use sdpipe::train::lora::{adapter_grads, install, loss_and_grads, train_step};
use sdpipe::train::optim::{AdamW, AdamWConfig};

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

/// Slice `i` of the leading axis of a host tensor, as a dfdx tensor of rank 3 or 4.
fn part(t: &HostTensor, i: usize) -> HostTensor {
    let inner: usize = t.shape[1..].iter().product();
    HostTensor::new(
        t.shape[1..].to_vec(),
        t.data[i * inner..(i + 1) * inner].to_vec(),
    )
    .unwrap()
}

fn max_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn three_lora_steps_match_peft() {
    let golden = read_safetensors(&fixtures().join("goldens/lora_training.safetensors"))
        .unwrap()
        .tensors;
    let dev = Cpu::default();
    let mut unet = Checkpoint::open(fixtures().join("tiny-sd"))
        .unwrap()
        .load_unet(&dev)
        .unwrap();

    // The initial adapters: PEFT's lora_A = down, lora_B = up; rank 4, alpha 2.
    let mut network = LoraNetwork::default();
    for (key, t) in &golden {
        if let Some(module) = key
            .strip_prefix("init.")
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
        {
            let up = golden[&format!("init.{module}.lora_B.weight")].clone();
            network.unet.insert(
                module.to_string(),
                LoraModule {
                    down: t.clone(),
                    up,
                    alpha: 2.0,
                }
                .into(),
            );
        }
    }
    assert_eq!(network.unet.len(), 32);
    install(&mut unet, &network, 1.0, &dev).unwrap();

    let ddpm = Ddpm::new(&SchedulerConfig::sd15()).unwrap();
    let mut optimizer = AdamW::new(&dev, AdamWConfig::default());
    let losses = &golden["losses"];
    let mut worst = BTreeMap::new();
    for step in 0..3 {
        let latents = part(&golden["latents"], step)
            .to_tensor::<(usize, usize, usize, usize), _>(&dev)
            .unwrap();
        let noise = part(&golden["noise"], step)
            .to_tensor::<(usize, usize, usize, usize), _>(&dev)
            .unwrap();
        let context = part(&golden["encoder_hidden_states"], step)
            .to_tensor::<(usize, usize, usize), _>(&dev)
            .unwrap();
        let timesteps: Vec<usize> = part(&golden["timesteps"], step)
            .data
            .iter()
            .map(|&t| t as usize)
            .collect();
        if step == 0 {
            let (_, grads) =
                loss_and_grads(&unet, &ddpm, &latents, &noise, &timesteps, &context).unwrap();
            let mut g = 0.0f32;
            for (name, grad) in adapter_grads(&mut unet, &grads) {
                g = g.max(max_diff(&grad, &golden[&format!("grad_step0.{name}")]));
            }
            worst.insert("grad_step0", g);
            assert!(g <= 1e-6, "first-step gradients differ by {g}");
        }
        let loss = train_step(
            &mut unet,
            &ddpm,
            &latents,
            &noise,
            &timesteps,
            &context,
            &mut optimizer,
            1e-3,
        )
        .unwrap();
        let err = (loss - losses.data[step]).abs();
        worst.insert(["loss0", "loss1", "loss2"][step], err);
        assert!(
            err <= 1e-5,
            "loss of step {step}: {loss} vs {}",
            losses.data[step]
        );
    }
    let trained = sdpipe::train::lora::extract(&mut unet, 2.0);
    let mut p = 0.0f32;
    for (module, m) in &trained.unet {
        p = p.max(max_diff(
            &m.as_lora().unwrap().down,
            &golden[&format!("final.{module}.lora_A.weight")],
        ));
        p = p.max(max_diff(
            &m.as_lora().unwrap().up,
            &golden[&format!("final.{module}.lora_B.weight")],
        ));
    }
    worst.insert("final params", p);
    println!("max abs errors: {worst:?}");
    assert!(p <= 5e-4, "final parameters differ by {p}");
}

/// diffusers' noised batch (`add_noise.*` goldens: x0, noise, noisy, timesteps, and the ε and
/// v targets by name), the tiny UNet and one caption's text states.
struct NoisedGolden {
    sched: BTreeMap<String, HostTensor>,
    unet: sdpipe::diffusion::UNet<Cpu>,
    x0: Tensor<(usize, usize, usize, usize), f32, Cpu>,
    noise: Tensor<(usize, usize, usize, usize), f32, Cpu>,
    noisy: Tensor<(usize, usize, usize, usize), f32, Cpu>,
    timesteps: Vec<usize>,
    context: Tensor<(usize, usize, usize), f32, Cpu>,
}

fn noised_golden() -> NoisedGolden {
    let sched = read_safetensors(&fixtures().join("goldens/schedulers.safetensors"))
        .unwrap()
        .tensors;
    let training = read_safetensors(&fixtures().join("goldens/lora_training.safetensors"))
        .unwrap()
        .tensors;
    let dev = Cpu::default();
    let unet = Checkpoint::open(fixtures().join("tiny-sd"))
        .unwrap()
        .load_unet(&dev)
        .unwrap();
    let t4 = |name: &str| {
        sched[name]
            .to_tensor::<(usize, usize, usize, usize), _>(&dev)
            .unwrap()
    };
    let (x0, noise, noisy) = (
        t4("add_noise.x0"),
        t4("add_noise.noise"),
        t4("add_noise.noisy"),
    );
    let timesteps: Vec<usize> = sched["add_noise.timesteps"]
        .data
        .iter()
        .map(|&t| t as usize)
        .collect();
    let context = part(&training["encoder_hidden_states"], 0)
        .to_tensor::<(usize, usize, usize), _>(&dev)
        .unwrap();
    NoisedGolden {
        sched,
        unet,
        x0,
        noise,
        noisy,
        timesteps,
        context,
    }
}

/// The training objective of a v-prediction model: the loss is the mean squared error against
/// diffusers' `DDPMScheduler(prediction_type="v_prediction").get_velocity` target (the golden
/// `add_noise.velocity`), not against the noise.
#[test]
fn v_prediction_trains_against_the_velocity() {
    use sdpipe::diffusion::schedulers::PredictionType;
    use sdpipe::train::objective;

    let NoisedGolden {
        sched,
        unet,
        x0,
        noise,
        noisy,
        timesteps,
        context,
    } = noised_golden();

    // The reference: the UNet on diffusers' noisy latents, against diffusers' targets.
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let pred = unet.forward(noisy, &t, context.clone()).unwrap().as_vec();
    let mse = |target: &[f32]| {
        pred.iter()
            .zip(target)
            .map(|(p, t)| (*p as f64 - *t as f64).powi(2))
            .sum::<f64>()
            / pred.len() as f64
    };
    let v_reference = mse(&sched["add_noise.velocity"].data);
    let eps_reference = mse(&sched["add_noise.noise"].data);
    assert!(
        (v_reference - eps_reference).abs() > 1e-3 * eps_reference,
        "the two targets must give different losses for the test to mean anything"
    );

    for (prediction_type, reference) in [
        (PredictionType::VPrediction, v_reference),
        (PredictionType::Epsilon, eps_reference),
    ] {
        let ddpm = Ddpm::new(&SchedulerConfig {
            prediction_type,
            ..SchedulerConfig::sd15()
        })
        .unwrap();
        let (loss, _) = objective::loss_and_grads::<f32, _>(
            &unet,
            &ddpm,
            &x0,
            &noise,
            &timesteps,
            context.retaped(),
            1.0,
        )
        .unwrap();
        let eval =
            objective::eval_loss::<f32, _>(&unet, &ddpm, &x0, &noise, &timesteps, context.clone())
                .unwrap();
        // The LoRA step's own entry point goes through the same objective.
        let (lora_loss, _) =
            loss_and_grads(&unet, &ddpm, &x0, &noise, &timesteps, &context).unwrap();
        for (what, value) in [
            ("training", loss),
            ("evaluation", eval),
            ("LoRA step", lora_loss),
        ] {
            let err = (value as f64 - reference).abs() / reference;
            assert!(
                err <= 1e-5,
                "{prediction_type:?} {what} loss {value} vs diffusers' target {reference} ({err:e})"
            );
        }
    }
}

/// `min_snr_gamma` and `debiased_estimation` weight each sample's squared error by its
/// timestep, as diffusers' training examples and kohya compute it: the weighted loss equals
/// the mean over samples of `w_t · mse_i` taken from diffusers' targets, while the evaluation
/// loss stays the plain MSE.
#[test]
fn snr_weighted_losses_weight_each_sample_by_its_timestep() {
    use sdpipe::diffusion::schedulers::{LossWeighting, PredictionType};
    use sdpipe::train::objective;

    let NoisedGolden {
        sched,
        unet,
        x0,
        noise,
        noisy,
        timesteps,
        context,
    } = noised_golden();
    let b = timesteps.len();
    assert!(b >= 2, "weights need several samples to matter");
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let pred = unet.forward(noisy, &t, context.clone()).unwrap().as_vec();
    let per = pred.len() / b;
    // Each sample's MSE against diffusers' target.
    let sample_mse = |target: &[f32], i: usize| {
        (i * per..(i + 1) * per)
            .map(|k| (pred[k] as f64 - target[k] as f64).powi(2))
            .sum::<f64>()
            / per as f64
    };

    for (prediction_type, target) in [
        (PredictionType::Epsilon, "add_noise.noise"),
        (PredictionType::VPrediction, "add_noise.velocity"),
    ] {
        let config = SchedulerConfig {
            prediction_type,
            ..SchedulerConfig::sd15()
        };
        let ddpm = Ddpm::new(&config).unwrap();
        let snr = ddpm.snr(&timesteps).unwrap();
        let v = prediction_type == PredictionType::VPrediction;
        for (weighting, formula) in [
            (
                LossWeighting {
                    min_snr_gamma: Some(5.0),
                    debiased_estimation: false,
                },
                // diffusers: min(snr, γ) / snr (ε) or / (snr + 1) (v)
                Box::new(move |s: f64| s.min(5.0) / if v { s + 1.0 } else { s })
                    as Box<dyn Fn(f64) -> f64>,
            ),
            (
                LossWeighting {
                    min_snr_gamma: None,
                    debiased_estimation: true,
                },
                // kohya: 1 / sqrt(min(snr, 1000)) (ε) or 1 / sqrt(min(snr, 1000) + 1) (v)
                Box::new(move |s: f64| 1.0 / (s.min(1000.0) + if v { 1.0 } else { 0.0 }).sqrt()),
            ),
        ] {
            let reference = (0..b)
                .map(|i| formula(snr[i]) * sample_mse(&sched[target].data, i))
                .sum::<f64>()
                / b as f64;
            let weighted = ddpm.clone().with_loss_weighting(weighting);
            let (loss, _) = objective::loss_and_grads::<f32, _>(
                &unet,
                &weighted,
                &x0,
                &noise,
                &timesteps,
                context.retaped(),
                1.0,
            )
            .unwrap();
            let err = (loss as f64 - reference).abs() / reference;
            assert!(
                err <= 1e-5,
                "{prediction_type:?} {weighting:?}: loss {loss} vs {reference} ({err:e})"
            );
            let plain = (0..b)
                .map(|i| sample_mse(&sched[target].data, i))
                .sum::<f64>()
                / b as f64;
            assert!(
                (reference - plain).abs() > 1e-3 * plain,
                "the weights must change the loss for the test to mean anything"
            );
            let eval = objective::eval_loss::<f32, _>(
                &unet,
                &weighted,
                &x0,
                &noise,
                &timesteps,
                context.clone(),
            )
            .unwrap();
            assert!(
                (eval as f64 - plain).abs() / plain <= 1e-5,
                "evaluation stays plain MSE"
            );
        }
    }
}
