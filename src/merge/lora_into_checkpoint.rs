//! LoRA networks baked into a model's weights: `W + w · alpha/rank · up·down` for every module
//! (linear and conv, UNet and text encoder), several networks in turn, each with its weight —
//! what A1111's "merge LoRA" and diffusers' `fuse_lora` produce.

use std::collections::BTreeMap;

use super::{MergeError, Result};
use crate::formats::HostTensor;
use crate::formats::checkpoint::ModelTensors;
use crate::formats::lora::{KnownModules, LoraComponent, LoraNetwork, NetworkModule};

/// The model's LoRA-able modules and their weight shapes, for reading kohya names exactly
/// ([`crate::formats::lora::read_lora`]): UNet weights as they are, text-encoder weights
/// under `text_model.`.
pub fn known_modules(model: &ModelTensors) -> KnownModules {
    let te: Vec<(String, Vec<usize>)> = model
        .text_encoder
        .iter()
        .map(|(k, t)| (format!("text_model.{k}"), t.shape.clone()))
        .collect();
    let mut known = KnownModules::from_weights(
        model
            .unet
            .iter()
            .map(|(k, t)| (k.as_str(), t.shape.as_slice())),
    );
    known.text_encoder =
        KnownModules::from_weights(te.iter().map(|(k, s)| (k.as_str(), s.as_slice()))).text_encoder;
    known
}

/// [`known_modules`] from a checkpoint's tensor shapes alone (nothing is read).
pub fn known_modules_of(ckpt: &crate::diffusion::Checkpoint) -> KnownModules {
    let shapes = |store: &crate::diffusion::nn::weights::WeightStore, prefix: &str| {
        store
            .names()
            .filter_map(|n| store.shape(n).map(|s| (format!("{prefix}{n}"), s)))
            .collect::<Vec<_>>()
    };
    let unet = shapes(ckpt.unet_weights(), "");
    let te = shapes(ckpt.text_encoder_weights(), "text_model.");
    let mut known =
        KnownModules::from_weights(unet.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
    known.text_encoder =
        KnownModules::from_weights(te.iter().map(|(k, s)| (k.as_str(), s.as_slice()))).text_encoder;
    known
}

/// The key, in [`ModelTensors`], of the weight a module changes (`<path>.weight`; the text
/// encoder's without `text_model.`).
pub fn weight_of_module(component: LoraComponent, module: &str) -> String {
    match component {
        LoraComponent::Unet => format!("{module}.weight"),
        LoraComponent::TextEncoder => {
            let m = module.strip_prefix("text_model.").unwrap_or(module);
            format!("{m}.weight")
        }
    }
}

fn component_mut(model: &mut ModelTensors, c: LoraComponent) -> &mut BTreeMap<String, HostTensor> {
    match c {
        LoraComponent::Unet => &mut model.unet,
        LoraComponent::TextEncoder => &mut model.text_encoder,
    }
}

/// Adds `multiplier · module.delta` to `weight`. A linear update also fits a 1x1 conv weight
/// `[o, i, 1, 1]` (and a 1x1 conv update a linear weight), as kohya allows.
fn add_delta(
    lora: &str,
    module_path: &str,
    key: &str,
    weight: &mut HostTensor,
    module: &NetworkModule,
    multiplier: f32,
) -> Result<()> {
    let misfit = |expected: Vec<usize>| MergeError::TargetShape {
        lora: lora.to_string(),
        module: module_path.to_string(),
        weight: key.to_string(),
        expected,
        found: weight.shape.clone(),
    };
    let module = match module {
        NetworkModule::Lora(m) => m,
        // LoHa, LoKr and DoRA: the update for this weight (DoRA's depends on it)
        other => {
            let delta =
                (other.delta_for(weight, multiplier)).map_err(|_| misfit(other.weight_shape()))?;
            for (w, d) in weight.data.iter_mut().zip(&delta.data) {
                *w += d;
            }
            return Ok(());
        }
    };
    let delta = module.delta(multiplier);
    let squeeze = |s: &[usize]| -> Vec<usize> {
        if s.len() == 4 && s[2] == 1 && s[3] == 1 {
            s[..2].to_vec()
        } else {
            s.to_vec()
        }
    };
    if squeeze(&delta.shape) != squeeze(&weight.shape) {
        return Err(MergeError::TargetShape {
            lora: lora.to_string(),
            module: module_path.to_string(),
            weight: key.to_string(),
            expected: delta.shape,
            found: weight.shape.clone(),
        });
    }
    for (w, d) in weight.data.iter_mut().zip(&delta.data) {
        *w += d;
    }
    Ok(())
}

/// Merges each `(name, network, multiplier)` into `model` in order. Every module must find its
/// weight with a fitting shape, else the error names the LoRA, the module and the weight and
/// nothing is changed. Returns the number of weights changed.
pub fn merge_loras(model: &mut ModelTensors, loras: &[(&str, &LoraNetwork, f32)]) -> Result<usize> {
    // check everything first, so a bad LoRA leaves the model untouched
    for (name, net, _) in loras {
        for (component, path, module) in net.iter() {
            let key = weight_of_module(component, path);
            let weights = match component {
                LoraComponent::Unet => &model.unet,
                LoraComponent::TextEncoder => &model.text_encoder,
            };
            let Some(w) = weights.get(&key) else {
                let available: Vec<&str> = weights
                    .keys()
                    .filter(|k| k.ends_with(".weight") && !k.contains("norm"))
                    .take(6)
                    .map(String::as_str)
                    .collect();
                return Err(MergeError::MissingTarget {
                    lora: name.to_string(),
                    module: path.clone(),
                    weight: key,
                    available: available.join(", "),
                });
            };
            let mut probe = HostTensor::zeros(w.shape.clone());
            add_delta(name, path, &key, &mut probe, module, 0.0)?;
        }
    }
    let mut changed = std::collections::BTreeSet::new();
    for (name, net, multiplier) in loras {
        for (component, path, module) in net.iter() {
            let key = weight_of_module(component, path);
            if let Some(w) = component_mut(model, component).get_mut(&key) {
                add_delta(name, path, &key, w, module, *multiplier)?;
                changed.insert((component, key));
            }
        }
    }
    Ok(changed.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::lora::LoraModule;

    fn model() -> ModelTensors {
        let mut m = ModelTensors::default();
        m.unet.insert(
            "a.to_q.weight".into(),
            HostTensor::new(vec![2, 3], vec![1.0; 6]).unwrap(),
        );
        m.unet.insert(
            "a.proj_in.weight".into(),
            HostTensor::new(vec![2, 2, 1, 1], vec![0.0; 4]).unwrap(),
        );
        m.text_encoder.insert(
            "encoder.layers.0.self_attn.q_proj.weight".into(),
            HostTensor::new(vec![2, 2], vec![0.0; 4]).unwrap(),
        );
        m
    }

    fn module(
        up: Vec<f32>,
        up_shape: Vec<usize>,
        down: Vec<f32>,
        down_shape: Vec<usize>,
        alpha: f32,
    ) -> NetworkModule {
        NetworkModule::Lora(LoraModule {
            up: HostTensor::new(up_shape, up).unwrap(),
            down: HostTensor::new(down_shape, down).unwrap(),
            alpha,
        })
    }

    #[test]
    fn known_modules_from_shapes_equal_those_from_tensors() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
        let ckpt = crate::diffusion::Checkpoint::open(dir).unwrap();
        let a = known_modules_of(&ckpt);
        let b = known_modules(&ModelTensors::read(&ckpt).unwrap());
        assert_eq!(a.unet, b.unet);
        assert_eq!(a.text_encoder, b.text_encoder);
        assert!(
            a.text_encoder
                .contains_key("text_model.encoder.layers.0.self_attn.q_proj")
        );
    }

    #[test]
    fn merges_unet_te_and_1x1_modules_with_weights_and_names_bad_modules() {
        let mut net = LoraNetwork::default();
        // rank 1, alpha 2 → scale 2
        net.unet.insert(
            "a.to_q".into(),
            module(
                vec![1.0, 2.0],
                vec![2, 1],
                vec![1.0, 0.0, -1.0],
                vec![1, 3],
                2.0,
            ),
        );
        // a linear update for a 1x1 conv weight
        net.unet.insert(
            "a.proj_in".into(),
            module(vec![1.0, 1.0], vec![2, 1], vec![3.0, 4.0], vec![1, 2], 1.0),
        );
        net.text_encoder.insert(
            "text_model.encoder.layers.0.self_attn.q_proj".into(),
            module(vec![1.0, 0.0], vec![2, 1], vec![0.0, 1.0], vec![1, 2], 1.0),
        );
        let mut m = model();
        let n = merge_loras(&mut m, &[("x", &net, 0.5), ("y", &net, 0.25)]).unwrap();
        assert_eq!(n, 3);
        // W + (0.5 + 0.25) · 2 · up·down
        assert_eq!(
            m.unet["a.to_q.weight"].data,
            vec![2.5, 1.0, -0.5, 4.0, 1.0, -2.0]
        );
        assert_eq!(m.unet["a.proj_in.weight"].data, vec![2.25, 3.0, 2.25, 3.0]);
        assert_eq!(
            m.text_encoder["encoder.layers.0.self_attn.q_proj.weight"].data,
            vec![0.0, 0.75, 0.0, 0.0]
        );

        // a module the model lacks, and one of the wrong width: named errors, model untouched
        let mut other = LoraNetwork::default();
        other.unet.insert(
            "input_blocks.1.attn.to_k".into(),
            module(vec![1.0, 1.0], vec![2, 1], vec![1.0; 3], vec![1, 3], 1.0),
        );
        let before = model();
        let mut m = model();
        let err = merge_loras(&mut m, &[("sdxl", &other, 1.0)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`sdxl`") && err.contains("input_blocks.1.attn.to_k"),
            "{err}"
        );
        assert_eq!(m, before);
        let mut wide = LoraNetwork::default();
        wide.unet.insert(
            "a.to_q".into(),
            module(vec![1.0, 1.0], vec![2, 1], vec![1.0; 4], vec![1, 4], 1.0),
        );
        let err = merge_loras(&mut m, &[("sd2", &wide, 1.0)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.to_q") && err.contains("[2, 4]") && err.contains("[2, 3]"),
            "{err}"
        );
        assert_eq!(m, before);
    }
}
