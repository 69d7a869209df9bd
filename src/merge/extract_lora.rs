//! A LoRA extracted from a fine-tuned checkpoint and its base, as kohya's
//! `networks/extract_lora_from_models.py` does: per target module, `delta = tuned − base`,
//! truncated SVD to rank `r`, `up = U·S`, `down = Vᵀ`, both clamped at the 0.99 quantile of
//! their values, `alpha = r` (so the stored scale is 1). The text encoder is extracted only when
//! it changed by more than `min_diff` somewhere (kohya's test for "the text encoder was
//! trained").

use std::collections::BTreeMap;

use super::combine_loras::factorise;
use super::{MergeError, Result};
use crate::formats::HostTensor;
use crate::formats::checkpoint::ModelTensors;
use crate::formats::lora::LoraNetwork;

/// Which modules to extract.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtractTargets {
    /// The attention projections: UNet `to_q/to_k/to_v/to_out.0`, text-encoder
    /// `q_proj/k_proj/v_proj/out_proj` (what sdpipe's LoRA training targets by default and its
    /// sampler applies).
    #[default]
    Attention,
    /// kohya's LoRA module set: every linear (and 1x1 conv) of the UNet transformer blocks
    /// (attention, `proj_in/proj_out`, feed-forward) and of the text encoder (attention, MLP).
    AllLinear,
}

/// Options of [`extract_lora`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractOptions {
    /// Rank of linear (and 1x1 conv) modules.
    pub rank: usize,
    /// Rank of the UNet ResNet / resampler 3x3 convolutions; `None` leaves them out (kohya's
    /// `conv_dim`).
    pub conv_rank: Option<usize>,
    /// Network alpha (default: the module's rank).
    pub alpha: Option<f32>,
    /// The module set.
    pub targets: ExtractTargets,
    /// Whether to consider the text encoder at all.
    pub text_encoder: bool,
    /// The text encoder counts as trained when some target weight changed by more than this
    /// (kohya: 0.01).
    pub min_diff: f32,
    /// kohya's clamp quantile (0.99; 1 disables).
    pub clamp_quantile: f32,
    /// Seed of the randomised SVD.
    pub seed: u64,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            rank: 4,
            conv_rank: None,
            alpha: None,
            targets: ExtractTargets::Attention,
            text_encoder: true,
            min_diff: 0.01,
            clamp_quantile: 0.99,
            seed: 0,
        }
    }
}

/// What an extraction found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtractReport {
    /// UNet modules extracted.
    pub unet_modules: usize,
    /// Text-encoder modules extracted.
    pub text_encoder_modules: usize,
    /// Largest absolute text-encoder weight change seen.
    pub text_encoder_max_diff: f32,
    /// Relative Frobenius error `‖delta − lora‖ / ‖delta‖` over all extracted modules.
    pub relative_error: f64,
}

fn unet_target(module: &str, shape: &[usize], opts: &ExtractOptions) -> Option<usize> {
    let in_transformer = module.contains(".attentions.");
    let attention = in_transformer
        && [".to_q", ".to_k", ".to_v", ".to_out.0"]
            .iter()
            .any(|s| module.ends_with(s));
    if attention {
        return Some(opts.rank);
    }
    if opts.targets == ExtractTargets::AllLinear
        && in_transformer
        && [".proj_in", ".proj_out", ".ff.net.0.proj", ".ff.net.2"]
            .iter()
            .any(|s| module.ends_with(s))
    {
        return Some(opts.rank);
    }
    let conv_rank = opts.conv_rank?;
    let resnet_or_sampler = module.contains(".resnets.")
        || module.contains(".downsamplers.")
        || module.contains(".upsamplers.");
    if resnet_or_sampler && shape.len() == 4 {
        let kxk = shape[2] > 1 || shape[3] > 1;
        return Some(if kxk { conv_rank } else { opts.rank });
    }
    None
}

fn te_target(module: &str, opts: &ExtractOptions) -> bool {
    let attention = [
        ".self_attn.q_proj",
        ".self_attn.k_proj",
        ".self_attn.v_proj",
        ".self_attn.out_proj",
    ]
    .iter()
    .any(|s| module.ends_with(s));
    attention
        || (opts.targets == ExtractTargets::AllLinear
            && [".mlp.fc1", ".mlp.fc2"].iter().any(|s| module.ends_with(s)))
}

fn difference(
    side: &str,
    key: &str,
    tuned: &HostTensor,
    base: &BTreeMap<String, HostTensor>,
) -> Result<HostTensor> {
    let b = base.get(key).ok_or_else(|| {
        MergeError::Invalid(format!(
            "the base model has no {side} tensor `{key}` that the tuned model has: they are not the same architecture"
        ))
    })?;
    if b.shape != tuned.shape {
        return Err(MergeError::ShapeMismatch {
            name: key.to_string(),
            what: "the tuned model".into(),
            a: tuned.shape.clone(),
            other: "the base model".into(),
            b: b.shape.clone(),
        });
    }
    Ok(HostTensor {
        shape: tuned.shape.clone(),
        data: tuned.data.iter().zip(&b.data).map(|(t, b)| t - b).collect(),
    })
}

/// Extracts a LoRA approximating `tuned − base` (see the module docs and [`ExtractOptions`]).
pub fn extract_lora(
    tuned: &ModelTensors,
    base: &ModelTensors,
    opts: &ExtractOptions,
) -> Result<(LoraNetwork, ExtractReport)> {
    if opts.rank == 0 || opts.conv_rank == Some(0) {
        return Err(MergeError::Invalid("the rank must be at least 1".into()));
    }
    let mut net = LoraNetwork::default();
    let mut report = ExtractReport::default();
    let (mut err2, mut norm2) = (0.0f64, 0.0f64);
    let mut account = |delta: &HostTensor, m: &crate::formats::lora::LoraModule| {
        let got = m.delta(1.0);
        for (d, g) in delta.data.iter().zip(&got.data) {
            err2 += ((d - g) as f64).powi(2);
            norm2 += (*d as f64).powi(2);
        }
    };
    for (key, t) in &tuned.unet {
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        let Some(rank) = unet_target(module, &t.shape, opts) else {
            continue;
        };
        let delta = difference("UNet", key, t, &base.unet)?;
        let m = factorise(&delta, rank, opts.alpha, opts.clamp_quantile, opts.seed);
        account(&delta, &m);
        net.unet.insert(module.to_string(), m.into());
    }
    if opts.text_encoder {
        let mut deltas = Vec::new();
        for (key, t) in &tuned.text_encoder {
            let Some(module) = key.strip_suffix(".weight") else {
                continue;
            };
            if !te_target(module, opts) {
                continue;
            }
            let delta = difference("text-encoder", key, t, &base.text_encoder)?;
            let max = delta.data.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            report.text_encoder_max_diff = report.text_encoder_max_diff.max(max);
            deltas.push((format!("text_model.{module}"), delta));
        }
        if report.text_encoder_max_diff > opts.min_diff {
            for (module, delta) in deltas {
                let m = factorise(
                    &delta,
                    opts.rank,
                    opts.alpha,
                    opts.clamp_quantile,
                    opts.seed,
                );
                account(&delta, &m);
                net.text_encoder.insert(module, m.into());
            }
        }
    }
    if net.is_empty() {
        return Err(MergeError::Invalid(
            "the model has none of the modules to extract (no UNet attention projections)".into(),
        ));
    }
    report.unet_modules = net.unet.len();
    report.text_encoder_modules = net.text_encoder.len();
    report.relative_error = if norm2 > 0.0 {
        (err2 / norm2).sqrt()
    } else {
        0.0
    };
    Ok((net, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::InitRng;

    fn tensors(seed: u64) -> ModelTensors {
        let mut m = ModelTensors::default();
        let mut rng = InitRng::new(seed);
        for (k, s) in [
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                vec![8, 6],
            ),
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                vec![8, 5],
            ),
            (
                "down_blocks.0.attentions.0.proj_in.weight",
                vec![8, 8, 1, 1],
            ),
            ("down_blocks.0.resnets.0.conv1.weight", vec![4, 3, 3, 3]),
            ("down_blocks.0.resnets.0.norm1.weight", vec![4]),
        ] {
            let n = s.iter().product();
            m.unet
                .insert(k.into(), HostTensor::new(s, rng.normal(n, 1.0)).unwrap());
        }
        m.text_encoder.insert(
            "encoder.layers.0.self_attn.q_proj.weight".into(),
            HostTensor::new(vec![6, 6], rng.normal(36, 1.0)).unwrap(),
        );
        m
    }

    #[test]
    fn full_rank_extraction_reconstructs_the_difference() {
        let base = tensors(1);
        let tuned = tensors(2);
        let opts = ExtractOptions {
            rank: 8,
            conv_rank: Some(27),
            clamp_quantile: 1.0,
            ..Default::default()
        };
        let (net, report) = extract_lora(&tuned, &base, &opts).unwrap();
        assert_eq!(report.unet_modules, 3, "q, k and the 3x3 conv");
        assert_eq!(report.text_encoder_modules, 1);
        assert!(report.relative_error < 1e-5, "{report:?}");
        let key = "down_blocks.0.resnets.0.conv1";
        let m = &net.unet[key];
        assert_eq!(
            m.as_lora().unwrap().down.shape,
            vec![4, 3, 3, 3],
            "rank capped at min(out, in·k·k)"
        );
        assert_eq!(m.alpha(), 4.0);
        let want = difference(
            "UNet",
            &format!("{key}.weight"),
            &tuned.unet[&format!("{key}.weight")],
            &base.unet,
        )
        .unwrap();
        assert!(m.as_lora().unwrap().delta(1.0).max_abs_diff(&want) < 1e-5);

        // low rank: the error is the singular-value tail; alpha only moves the scale
        let low = ExtractOptions {
            rank: 2,
            alpha: Some(1.0),
            text_encoder: false,
            clamp_quantile: 1.0,
            ..Default::default()
        };
        let (net, report) = extract_lora(&tuned, &base, &low).unwrap();
        assert_eq!(report.text_encoder_modules, 0);
        let k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let d = difference(
            "UNet",
            &format!("{k}.weight"),
            &tuned.unet[&format!("{k}.weight")],
            &base.unet,
        )
        .unwrap();
        let s = super::super::svd::low_rank(&d.data, 8, 6, 6, 0).singular_values;
        let got = net.unet[k].as_lora().unwrap().delta(1.0);
        let err = got
            .data
            .iter()
            .zip(&d.data)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let tail = s[2..].iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((err - tail).abs() < 1e-4, "{err} vs {tail}");
    }

    #[test]
    fn an_unchanged_text_encoder_is_skipped_and_mismatches_are_named() {
        let base = tensors(1);
        let mut tuned = tensors(1);
        for t in tuned.unet.values_mut() {
            t.data.iter_mut().for_each(|v| *v += 0.5);
        }
        let (net, report) = extract_lora(&tuned, &base, &ExtractOptions::default()).unwrap();
        assert!(net.text_encoder.is_empty());
        assert_eq!(report.text_encoder_max_diff, 0.0);
        tuned.unet.insert(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight".into(),
            HostTensor::zeros(vec![8, 7]),
        );
        let err = extract_lora(&tuned, &base, &ExtractOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("attn1.to_q.weight") && err.contains("[8, 7]"),
            "{err}"
        );
    }
}
