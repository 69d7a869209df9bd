//! LoRA networks: one in-memory form ([`LoraNetwork`]) read from kohya sd-scripts files,
//! diffusers `pytorch_lora_weights.safetensors` files and PEFT adapter directories, and written
//! in the kohya format that A1111, ComfyUI and diffusers all load.
//!
//! Module paths are diffusers module paths: `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`
//! for the UNet, `text_model.encoder.layers.0.self_attn.q_proj` for the text encoder. For a
//! module with weight `W` (`[out, in]`, or `[out, in, kh, kw]` for a conv), the LoRA adds
//! `multiplier · (alpha / rank) · up @ down` with `down: [rank, in(, kh, kw)]`, `up: [out, rank]`.

use std::collections::BTreeMap;

mod read;
mod write;

pub use read::read_lora;
pub use write::{KohyaMetadata, kohya_name, kohya_tensors, write_kohya};

use super::{HostTensor, Result};

/// Which model a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraComponent {
    /// The UNet (`lora_unet_…`, `unet.…`).
    Unet,
    /// The CLIP text encoder (`lora_te_…`, `text_encoder.…`).
    TextEncoder,
}

impl LoraComponent {
    fn kohya_prefix(self) -> &'static str {
        match self {
            LoraComponent::Unet => "lora_unet_",
            LoraComponent::TextEncoder => "lora_te_",
        }
    }

    fn diffusers_prefix(self) -> &'static str {
        match self {
            LoraComponent::Unet => "unet",
            LoraComponent::TextEncoder => "text_encoder",
        }
    }
}

/// The low-rank update of one module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// `[rank, in]` for a linear layer, `[rank, in, kh, kw]` for a conv (kohya `lora_down`,
    /// diffusers/PEFT `lora_A`).
    pub down: HostTensor,
    /// `[out, rank]` (kohya `lora_up`, diffusers/PEFT `lora_B`; conv files store
    /// `[out, rank, 1, 1]`, normalised here).
    pub up: HostTensor,
    /// The network alpha: the update is scaled by `alpha / rank`.
    pub alpha: f32,
}

impl LoraModule {
    /// A freshly initialised module for a weight of shape `[out, in]` or `[out, in, kh, kw]`,
    /// as kohya and PEFT initialise one: `down` kaiming-uniform with a = √5 (uniform in
    /// ±1/√fan_in, fan_in = in·kh·kw), `up` zero, so the network starts as the identity.
    /// Deterministic for `seed`.
    pub fn init(
        weight_shape: &[usize],
        rank: usize,
        alpha: f32,
        seed: u64,
    ) -> Result<Self, String> {
        if !(weight_shape.len() == 2 || weight_shape.len() == 4) || rank == 0 {
            return Err(format!(
                "cannot make a rank-{rank} LoRA for a weight of shape {weight_shape:?}"
            ));
        }
        let fan_in: usize = weight_shape[1..].iter().product();
        let mut down_shape = vec![rank];
        down_shape.extend_from_slice(&weight_shape[1..]);
        let mut rng = super::InitRng::new(seed);
        let down = HostTensor {
            data: rng.uniform(rank * fan_in, 1.0 / (fan_in as f64).sqrt()),
            shape: down_shape,
        };
        Ok(Self {
            down,
            up: HostTensor::zeros(vec![weight_shape[0], rank]),
            alpha,
        })
    }

    /// The rank (rows of `down`).
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }

    /// Whether this is a conv LoRA (4-d `down`).
    pub fn is_conv(&self) -> bool {
        self.down.shape.len() == 4
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }

    /// The weight shape this module applies to: `[out, in]` or `[out, in, kh, kw]`.
    pub fn weight_shape(&self) -> Vec<usize> {
        let mut s = vec![self.up.shape[0]];
        s.extend_from_slice(&self.down.shape[1..]);
        s
    }

    /// `multiplier · (alpha / rank) · up @ down`, shaped like the module weight.
    pub fn delta(&self, multiplier: f32) -> HostTensor {
        let r = self.rank();
        let out = self.up.shape[0];
        let cols = self.down.numel() / r; // in · kh · kw
        let s = multiplier * self.scale();
        let mut data = vec![0.0f32; out * cols];
        for o in 0..out {
            let row = &mut data[o * cols..(o + 1) * cols];
            for k in 0..r {
                let u = self.up.data[o * r + k];
                let d = &self.down.data[k * cols..(k + 1) * cols];
                for (acc, dv) in row.iter_mut().zip(d) {
                    *acc += u * dv;
                }
            }
            for v in row.iter_mut() {
                *v *= s;
            }
        }
        HostTensor {
            shape: self.weight_shape(),
            data,
        }
    }

    /// Adds [`delta`](Self::delta) to `weight` in place (`W + multiplier · alpha/rank · up@down`).
    /// Fails when the shapes differ.
    pub fn merge_into(&self, weight: &mut HostTensor, multiplier: f32) -> Result<(), String> {
        if weight.shape != self.weight_shape() {
            return Err(format!(
                "LoRA expects a weight of shape {:?}, the model's is {:?}",
                self.weight_shape(),
                weight.shape
            ));
        }
        let d = self.delta(multiplier);
        for (w, dv) in weight.data.iter_mut().zip(&d.data) {
            *w += dv;
        }
        Ok(())
    }
}

/// A LoRA network: modules by diffusers module path, per component.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraNetwork {
    /// UNet modules (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, …).
    pub unet: BTreeMap<String, LoraModule>,
    /// Text-encoder modules (`text_model.encoder.layers.0.self_attn.q_proj`, …).
    pub text_encoder: BTreeMap<String, LoraModule>,
}

impl LoraNetwork {
    /// The modules of one component.
    pub fn modules(&self, component: LoraComponent) -> &BTreeMap<String, LoraModule> {
        match component {
            LoraComponent::Unet => &self.unet,
            LoraComponent::TextEncoder => &self.text_encoder,
        }
    }

    /// The modules of one component, mutably.
    pub fn modules_mut(&mut self, component: LoraComponent) -> &mut BTreeMap<String, LoraModule> {
        match component {
            LoraComponent::Unet => &mut self.unet,
            LoraComponent::TextEncoder => &mut self.text_encoder,
        }
    }

    /// All modules with their component.
    pub fn iter(&self) -> impl Iterator<Item = (LoraComponent, &String, &LoraModule)> {
        self.unet
            .iter()
            .map(|(k, m)| (LoraComponent::Unet, k, m))
            .chain(
                self.text_encoder
                    .iter()
                    .map(|(k, m)| (LoraComponent::TextEncoder, k, m)),
            )
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.unet.len() + self.text_encoder.len()
    }

    /// Whether there are no modules.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every module against the model's weight shapes; the error names the module and
    /// the shapes, or lists some of the available module names when the model lacks it.
    pub fn check_against(&self, known: &KnownModules) -> Result<(), String> {
        for (component, path, m) in self.iter() {
            let shapes = known.component(component);
            let Some(w) = shapes.get(path) else {
                let avail: Vec<&str> = shapes.keys().take(8).map(String::as_str).collect();
                return Err(format!(
                    "LoRA module `{path}` ({component:?}) is not in the model; available modules include: {}",
                    avail.join(", ")
                ));
            };
            if *w != m.weight_shape() {
                return Err(format!(
                    "LoRA module `{path}` ({component:?}) has down {:?} / up {:?}, which does not fit the model weight {:?}",
                    m.down.shape, m.up.shape, w
                ));
            }
        }
        Ok(())
    }
}

/// The model's LoRA-able modules and their weight shapes (`[out, in]` or `[out, in, kh, kw]`),
/// used to map kohya's underscore names back to module paths and to check shapes.
#[derive(Debug, Clone, Default)]
pub struct KnownModules {
    /// UNet module path → weight shape.
    pub unet: BTreeMap<String, Vec<usize>>,
    /// Text-encoder module path → weight shape.
    pub text_encoder: BTreeMap<String, Vec<usize>>,
}

impl KnownModules {
    /// Builds the lists from `(weight key, shape)` pairs of a diffusers state dict: every
    /// 2-d or 4-d `<module>.weight` becomes a module. `text_encoder` keys are those starting
    /// with `text_model.`.
    pub fn from_weights<'a>(weights: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Self {
        let mut k = KnownModules::default();
        for (key, shape) in weights {
            let Some(module) = key.strip_suffix(".weight") else {
                continue;
            };
            if shape.len() != 2 && shape.len() != 4 {
                continue;
            }
            if module.starts_with("text_model.") {
                k.text_encoder.insert(module.to_string(), shape.to_vec());
            } else {
                k.unet.insert(module.to_string(), shape.to_vec());
            }
        }
        k
    }

    fn component(&self, c: LoraComponent) -> &BTreeMap<String, Vec<usize>> {
        match c {
            LoraComponent::Unet => &self.unet,
            LoraComponent::TextEncoder => &self.text_encoder,
        }
    }
}

/// The on-disk LoRA layouts this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya sd-scripts: `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
    /// diffusers: `unet.<path>.lora_A.weight` / `.lora_B.weight`, alpha in `lora_adapter_metadata`.
    Diffusers,
    /// PEFT: `base_model.model.<path>.lora_{A,B}.weight` + `adapter_config.json`.
    Peft,
}
