//! Gradient checkpointing recomputes each UNet block in the backward pass instead of keeping
//! its activations: the gradients must be those of the plain backward pass — of LoRA adapters
//! (on linear layers and, LoCon, on convolutions), of the text states (textual inversion), and of every weight (full fine-tuning).

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use sdpipe::diffusion::params::{Layers, named_grads};
use sdpipe::diffusion::schedulers::{Ddpm, SchedulerConfig};
use sdpipe::diffusion::{Checkpoint, UNet};
use sdpipe::formats::HostTensor;
use sdpipe::formats::lora::{LoraModule, LoraNetwork};
use sdpipe::train::lora::{adapter_grads, install, lora_modules, loss_and_grads_taped};

/// Named gradients of the parameters a test looks at.
type Named = BTreeMap<String, HostTensor>;
/// Picks those gradients out of a backward pass.
type Pick = dyn Fn(&mut UNet<Cpu>, &Gradients<f32, Cpu>) -> Named;

fn unet(dev: &Cpu) -> UNet<Cpu> {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-sd"
    ));
    Checkpoint::open(dir).unwrap().load_unet(dev).unwrap()
}

/// A deterministic pseudo-random tensor (no RNG state shared between the two runs).
fn values(n: usize, salt: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let x = (i.wrapping_mul(2654435761).wrapping_add(salt * 97)) % 1000;
            x as f32 / 500.0 - 1.0
        })
        .collect()
}

/// The loss, the gradients of the text states and of `model`'s parameters (by `pick`).
fn grads_of(unet: &mut UNet<Cpu>, dev: &Cpu, pick: &Pick) -> (f32, HostTensor, Named) {
    let c = unet.config.in_channels;
    let d = unet.config.cross_attention_dim;
    let latents = dev.tensor_from_vec(values(2 * c * 64, 1), (2, c, 8, 8));
    let noise = dev.tensor_from_vec(values(2 * c * 64, 2), (2, c, 8, 8));
    let context: Tensor<(usize, usize, usize), f32, Cpu> =
        dev.tensor_from_vec(values(2 * 77 * d, 3), (2, 77, d));
    let ddpm = Ddpm::new(&SchedulerConfig::sd15()).unwrap();
    let (loss, grads) = loss_and_grads_taped(
        unet,
        &ddpm,
        &latents,
        &noise,
        &[10, 700],
        context.leaky_trace(),
    )
    .unwrap();
    let context_grad = HostTensor::from_tensor(&grads.get(&context));
    (loss, context_grad, pick(unet, &grads))
}

fn max_rel(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    let scale = a.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// `tolerance`: the largest relative difference of a parameter gradient (the summation order of
/// the gradients flowing into a shared tensor differs between the two passes).
fn assert_same(
    label: &str,
    plain: (f32, HostTensor, Named),
    ckpt: (f32, HostTensor, Named),
    tolerance: f32,
) {
    assert_eq!(plain.0, ckpt.0, "{label}: the loss differs");
    let e = max_rel(&plain.1, &ckpt.1);
    println!("{label}: text-state gradient max rel err {e:.2e}");
    assert!(e < 1e-5, "{label}: text-state gradient differs ({e})");
    assert!(!plain.2.is_empty());
    assert_eq!(
        plain.2.keys().collect::<Vec<_>>(),
        ckpt.2.keys().collect::<Vec<_>>()
    );
    let mut worst = 0f32;
    for (name, g) in &plain.2 {
        assert!(
            g.data.iter().any(|v| *v != 0.0),
            "{label}: {name} has no gradient"
        );
        let e = max_rel(g, &ckpt.2[name]);
        assert!(e < tolerance, "{label}: {name} differs ({e})");
        worst = worst.max(e);
    }
    println!(
        "{label}: {} parameter gradients, max rel err {worst:.2e}",
        plain.2.len()
    );
}

#[test]
fn checkpointed_lora_gradients_equal_the_plain_ones() {
    let dev = Cpu::default();
    let mut model = unet(&dev);
    let mut network = LoraNetwork::default();
    // every adaptable layer: attention and feed-forward linears, and (LoCon) every conv
    for (i, (name, weight)) in lora_modules(&mut model).into_iter().enumerate() {
        let (out, fan_in) = (weight[0], weight[1..].iter().product::<usize>());
        let mut down_shape = vec![2];
        down_shape.extend(&weight[1..]);
        let module = LoraModule {
            down: HostTensor::new(down_shape, values(2 * fan_in, 10 + i as u64)).unwrap(),
            up: HostTensor::new(vec![out, 2], values(2 * out, 50 + i as u64)).unwrap(),
            alpha: 2.0,
        };
        network.unet.insert(name, module.into());
    }
    install(&mut model, &network, 1.0, &dev).unwrap();
    let pick = |m: &mut UNet<Cpu>, g: &Gradients<f32, Cpu>| adapter_grads(m, g);
    let plain = grads_of(&mut model, &dev, &pick);
    model.set_gradient_checkpointing(true);
    let ckpt = grads_of(&mut model, &dev, &pick);
    // ~1e-6 on most adapters; up to ~1.5e-5 on the time embedding's, whose input gradient sums
    // every ResNet's contribution (in another order when the blocks are recomputed) and is
    // then contracted with `up` (cancellation)
    assert_same("LoRA", plain, ckpt, 5e-5);
}

#[test]
fn checkpointed_full_fine_tuning_gradients_equal_the_plain_ones() {
    let dev = Cpu::default();
    let mut model = unet(&dev);
    model.set_trainable(true);
    let pick = |m: &mut UNet<Cpu>, g: &Gradients<f32, Cpu>| named_grads(m, g);
    let plain = grads_of(&mut model, &dev, &pick);
    model.set_gradient_checkpointing(true);
    let ckpt = grads_of(&mut model, &dev, &pick);
    assert_same("full UNet", plain, ckpt, 1e-5);
}
