//! LoRA networks: one in-memory form ([`LoraNetwork`]) read from kohya sd-scripts files,
//! diffusers `pytorch_lora_weights.safetensors` files and PEFT adapter directories, and written
//! in the kohya format that A1111, ComfyUI and diffusers all load.
//!
//! Module paths are diffusers module paths: `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`
//! for the UNet, `text_model.encoder.layers.0.self_attn.q_proj` for the text encoder. For a
//! module with weight `W` (`[out, in]`, or `[out, in, kh, kw]` for a conv), the LoRA adds
//! `multiplier · (alpha / rank) · up @ down` with `down: [rank, in(, kh, kw)]`, `up: [out, rank]`.

use std::collections::BTreeMap;

mod lycoris;
mod read;
mod write;

pub use lycoris::{
    DoraModule, HadaModule, KronFactor, KronModule, column_norms, factorization, fits,
};
pub(crate) use lycoris::{Trans, matmul};
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

/// Which algorithm a module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleKind {
    /// LoRA (LoCon on a convolution).
    Lora,
    /// DoRA: LoRA with a learned magnitude.
    Dora,
    /// LyCORIS LoHa.
    Hada,
    /// LyCORIS LoKr.
    Kron,
}

impl ModuleKind {
    /// The name users know it by.
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Lora => "LoRA",
            ModuleKind::Dora => "DoRA",
            ModuleKind::Hada => "LoHa",
            ModuleKind::Kron => "LoKr",
        }
    }
}

/// One module of a network: LoRA or one of the LyCORIS algorithms.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkModule {
    /// `alpha/r · up·down` (LoRA; LoCon on a convolution).
    Lora(LoraModule),
    /// A LoRA renormalised to a learned magnitude.
    Dora(DoraModule),
    /// `(w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r`.
    Hada(HadaModule),
    /// `(w1 ⊗ w2) · alpha/r`.
    Kron(KronModule),
}

impl From<LoraModule> for NetworkModule {
    fn from(m: LoraModule) -> Self {
        NetworkModule::Lora(m)
    }
}

/// `v` as a scalar tensor.
fn scalar(v: f32) -> HostTensor {
    HostTensor {
        shape: vec![],
        data: vec![v],
    }
}

impl NetworkModule {
    /// The algorithm.
    pub fn kind(&self) -> ModuleKind {
        match self {
            NetworkModule::Lora(_) => ModuleKind::Lora,
            NetworkModule::Dora(_) => ModuleKind::Dora,
            NetworkModule::Hada(_) => ModuleKind::Hada,
            NetworkModule::Kron(_) => ModuleKind::Kron,
        }
    }

    /// The plain LoRA module, if it is one.
    pub fn as_lora(&self) -> Option<&LoraModule> {
        match self {
            NetworkModule::Lora(m) => Some(m),
            _ => None,
        }
    }

    /// The plain LoRA module, mutably, if it is one.
    pub fn as_lora_mut(&mut self) -> Option<&mut LoraModule> {
        match self {
            NetworkModule::Lora(m) => Some(m),
            _ => None,
        }
    }

    /// The weight shape it applies to (see [`fits`]).
    pub fn weight_shape(&self) -> Vec<usize> {
        match self {
            NetworkModule::Lora(m) => m.weight_shape(),
            NetworkModule::Dora(m) => m.lora.weight_shape(),
            NetworkModule::Hada(m) => m.shape.clone(),
            NetworkModule::Kron(m) => m.shape.clone(),
        }
    }

    /// The network alpha.
    pub fn alpha(&self) -> f32 {
        match self {
            NetworkModule::Lora(m) => m.alpha,
            NetworkModule::Dora(m) => m.lora.alpha,
            NetworkModule::Hada(m) => m.alpha,
            NetworkModule::Kron(m) => m.alpha,
        }
    }

    /// The rank (`ss_network_dim`); a LoKr of two full factors has none and reports its alpha,
    /// which LyCORIS sets to the rank it was made with.
    pub fn rank(&self) -> usize {
        match self {
            NetworkModule::Lora(m) => m.rank(),
            NetworkModule::Dora(m) => m.lora.rank(),
            NetworkModule::Hada(m) => m.rank(),
            NetworkModule::Kron(m) => m.rank().unwrap_or((m.alpha.round() as usize).max(1)),
        }
    }

    /// Whether it applies to a convolution (known from a 4-d factor).
    pub fn is_conv(&self) -> bool {
        self.weight_shape().len() == 4
    }

    /// Trained values: `(parameter name, tensor)`, the names PEFT/LyCORIS give them
    /// (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`, `hada_w1_a`, `lokr_w1`, …).
    pub fn params(&self) -> Vec<(&'static str, &HostTensor)> {
        match self {
            NetworkModule::Lora(m) => vec![("lora_A.weight", &m.down), ("lora_B.weight", &m.up)],
            NetworkModule::Dora(m) => vec![
                ("lora_A.weight", &m.lora.down),
                ("lora_B.weight", &m.lora.up),
                ("lora_magnitude_vector", &m.magnitude),
            ],
            NetworkModule::Hada(m) => vec![
                ("hada_w1_a", &m.w1_a),
                ("hada_w1_b", &m.w1_b),
                ("hada_w2_a", &m.w2_a),
                ("hada_w2_b", &m.w2_b),
            ],
            NetworkModule::Kron(m) => {
                let mut v = Vec::new();
                for (f, full, a, b) in [
                    (&m.w1, "lokr_w1", "lokr_w1_a", "lokr_w1_b"),
                    (&m.w2, "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
                ] {
                    match f {
                        KronFactor::Full(t) => v.push((full, t)),
                        KronFactor::LowRank { a: ta, b: tb } => v.extend([(a, ta), (b, tb)]),
                    }
                }
                v
            }
        }
    }

    /// [`Self::params`], mutably.
    pub fn params_mut(&mut self) -> Vec<(&'static str, &mut HostTensor)> {
        match self {
            NetworkModule::Lora(m) => {
                vec![("lora_A.weight", &mut m.down), ("lora_B.weight", &mut m.up)]
            }
            NetworkModule::Dora(m) => vec![
                ("lora_A.weight", &mut m.lora.down),
                ("lora_B.weight", &mut m.lora.up),
                ("lora_magnitude_vector", &mut m.magnitude),
            ],
            NetworkModule::Hada(m) => vec![
                ("hada_w1_a", &mut m.w1_a),
                ("hada_w1_b", &mut m.w1_b),
                ("hada_w2_a", &mut m.w2_a),
                ("hada_w2_b", &mut m.w2_b),
            ],
            NetworkModule::Kron(m) => {
                let mut v = Vec::new();
                for (f, full, a, b) in [
                    (&mut m.w1, "lokr_w1", "lokr_w1_a", "lokr_w1_b"),
                    (&mut m.w2, "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
                ] {
                    match f {
                        KronFactor::Full(t) => v.push((full, t)),
                        KronFactor::LowRank { a: ta, b: tb } => v.extend([(a, ta), (b, tb)]),
                    }
                }
                v
            }
        }
    }

    /// Takes `fresh`'s alpha and weight shape (a module read back from a checkpoint, whose
    /// factors' file shapes may have flattened a conv kernel); an error when the kinds differ.
    pub fn conform_to(&mut self, fresh: &NetworkModule) -> Result<(), String> {
        if self.kind() != fresh.kind() {
            return Err(format!(
                "a {} module where a {} module is trained",
                self.kind().name(),
                fresh.kind().name()
            ));
        }
        match (self, fresh) {
            (NetworkModule::Lora(m), f) => m.alpha = f.alpha(),
            (NetworkModule::Dora(m), f) => m.lora.alpha = f.alpha(),
            (NetworkModule::Hada(m), f) => (m.alpha, m.shape) = (f.alpha(), f.weight_shape()),
            (NetworkModule::Kron(m), f) => (m.alpha, m.shape) = (f.alpha(), f.weight_shape()),
        }
        Ok(())
    }

    /// Number of trained values.
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|(_, t)| t.numel()).sum()
    }

    /// The tensors as kohya/LyCORIS files hold them, by key suffix (`lora_down.weight`,
    /// `hada_w1_a`, `dora_scale`, `alpha`, …; a conv LoRA's `up` as `[out, r, 1, 1]`).
    pub fn file_tensors(&self) -> Vec<(&'static str, HostTensor)> {
        let lora = |m: &LoraModule| {
            let mut up = m.up.clone();
            if m.is_conv() {
                up.shape.extend([1, 1]);
            }
            vec![
                ("lora_down.weight", m.down.clone()),
                ("lora_up.weight", up),
                ("alpha", scalar(m.alpha)),
            ]
        };
        match self {
            NetworkModule::Lora(m) => lora(m),
            NetworkModule::Dora(m) => {
                let mut v = lora(&m.lora);
                v.push(("dora_scale", m.magnitude.clone()));
                v
            }
            NetworkModule::Hada(_) | NetworkModule::Kron(_) => {
                let mut v: Vec<_> = (self.params().into_iter())
                    .map(|(k, t)| (k, t.clone()))
                    .collect();
                v.push(("alpha", scalar(self.alpha())));
                v
            }
        }
    }

    /// The update `multiplier` applies to `weight` (`W' − W`), shaped like `weight`; why not
    /// when the module does not fit it.
    pub fn delta_for(&self, weight: &HostTensor, multiplier: f32) -> Result<HostTensor, String> {
        if !fits(&self.weight_shape(), &weight.shape) {
            return Err(format!(
                "{} module for a {:?} weight does not fit the model's {:?}",
                self.kind().name(),
                self.weight_shape(),
                weight.shape
            ));
        }
        let mut d = match self {
            NetworkModule::Lora(m) => m.delta(multiplier),
            NetworkModule::Dora(m) => m.delta(weight, multiplier)?,
            NetworkModule::Hada(m) => m.delta(multiplier),
            NetworkModule::Kron(m) => m.delta(multiplier)?,
        };
        d.shape = weight.shape.clone();
        Ok(d)
    }

    /// Adds [`Self::delta_for`] to `weight` in place.
    pub fn merge_into(&self, weight: &mut HostTensor, multiplier: f32) -> Result<(), String> {
        let d = self.delta_for(weight, multiplier)?;
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
    pub unet: BTreeMap<String, NetworkModule>,
    /// Text-encoder modules (`text_model.encoder.layers.0.self_attn.q_proj`, …).
    pub text_encoder: BTreeMap<String, NetworkModule>,
}

impl LoraNetwork {
    /// The modules of one component.
    pub fn modules(&self, component: LoraComponent) -> &BTreeMap<String, NetworkModule> {
        match component {
            LoraComponent::Unet => &self.unet,
            LoraComponent::TextEncoder => &self.text_encoder,
        }
    }

    /// The modules of one component, mutably.
    pub fn modules_mut(
        &mut self,
        component: LoraComponent,
    ) -> &mut BTreeMap<String, NetworkModule> {
        match component {
            LoraComponent::Unet => &mut self.unet,
            LoraComponent::TextEncoder => &mut self.text_encoder,
        }
    }

    /// All modules with their component.
    pub fn iter(&self) -> impl Iterator<Item = (LoraComponent, &String, &NetworkModule)> {
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

    /// The algorithms its modules use, each once.
    pub fn kinds(&self) -> std::collections::BTreeSet<ModuleKind> {
        self.iter().map(|(_, _, m)| m.kind()).collect()
    }

    /// Every module as plain LoRA; an error naming the first that is not (for what only LoRA
    /// supports: concatenating ranks, SVD re-extraction).
    pub fn lora_modules(
        &self,
    ) -> Result<impl Iterator<Item = (LoraComponent, &String, &LoraModule)>, String> {
        if let Some((_, path, m)) = self.iter().find(|(_, _, m)| m.as_lora().is_none()) {
            return Err(format!(
                "module `{path}` is {}: only plain LoRA (and LoCon) modules can be used here",
                m.kind().name()
            ));
        }
        Ok(self
            .iter()
            .filter_map(|(c, p, m)| m.as_lora().map(|l| (c, p, l))))
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
            let fitting = match m {
                NetworkModule::Lora(l) => *w == l.weight_shape(),
                _ => fits(&m.weight_shape(), w),
            };
            if !fitting {
                let detail = match m {
                    NetworkModule::Lora(l) => {
                        format!("down {:?} / up {:?}", l.down.shape, l.up.shape)
                    }
                    m => format!("{} factors for {:?}", m.kind().name(), m.weight_shape()),
                };
                return Err(format!(
                    "LoRA module `{path}` ({component:?}) has {detail}, which does not fit the model weight {w:?}",
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
