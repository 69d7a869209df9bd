//! The UNet's architecture, worked out once from its config: every block with the shape it is
//! built with (each ResNet's and transformer's config, the skip widths of the up path, where the
//! samplers are), in module order. Loading builds the layers from it, the memory estimate counts
//! parameters and activations on it, and [`LdmKeys`] derives the original (LDM) single-file
//! key of every diffusers name from it, so no other code re-walks the architecture.

use std::collections::HashMap;

use crate::diffusion::attention::Transformer2DConfig;
use crate::diffusion::resnet::ResnetConfig;

use super::config::UNetConfig;

/// One down level, `down_blocks.{i}`: ResNets, a transformer after each on cross-attention
/// levels, then a stride-2 downsampler except on the deepest level.
#[derive(Debug, Clone, PartialEq)]
pub struct DownLevel {
    /// The level's width (every ResNet's output).
    pub channels: usize,
    /// The ResNets in order (the first takes the previous level's width).
    pub resnets: Vec<ResnetConfig>,
    /// The transformer after each ResNet (empty for `DownBlock2D`).
    pub attentions: Vec<Transformer2DConfig>,
    /// The padding of the downsampler after the level (`None` on the deepest).
    pub downsample_padding: Option<usize>,
}

/// `mid_block`: ResNet, transformer, ResNet at the deepest level's width.
#[derive(Debug, Clone, PartialEq)]
pub struct MidLevel {
    /// `resnets.0` and `resnets.1`.
    pub resnets: [ResnetConfig; 2],
    /// `attentions.0`.
    pub attention: Transformer2DConfig,
}

/// One up level, `up_blocks.{i}` (deepest first): ResNets on the running state concatenated
/// with a skip state, a transformer after each on cross-attention levels, then a nearest ×2
/// upsampler and a conv except on the last level.
#[derive(Debug, Clone, PartialEq)]
pub struct UpLevel {
    /// The down level it mirrors (its width and resolution).
    pub level: usize,
    /// The level's width.
    pub channels: usize,
    /// The ResNets in order; each one's `in_channels` counts its skip state.
    pub resnets: Vec<ResnetConfig>,
    /// The width of the skip state each ResNet concatenates (in the order they are taken).
    pub skip_channels: Vec<usize>,
    /// The transformer after each ResNet (empty for `UpBlock2D`).
    pub attentions: Vec<Transformer2DConfig>,
    /// Whether an upsampler follows.
    pub upsample: bool,
}

/// The architecture of one UNet (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetPlan {
    /// Latent channels in (`conv_in`'s input).
    pub in_channels: usize,
    /// Channels out (`conv_out`'s output).
    pub out_channels: usize,
    /// Width of the first level (`conv_in`'s output, the timestep features).
    pub base_channels: usize,
    /// Width of the time embedding (4 × `base_channels`).
    pub temb_channels: usize,
    /// GroupNorm groups of every norm.
    pub groups: usize,
    /// Epsilon of the ResNet and output GroupNorms.
    pub eps: f64,
    /// Down levels.
    pub down: Vec<DownLevel>,
    /// The mid block.
    pub mid: MidLevel,
    /// Up levels, deepest first.
    pub up: Vec<UpLevel>,
}

impl UNetPlan {
    /// The plan of the UNet `c`, or why this code cannot lay it out
    /// ([`UNetConfig::validate_layout`]; loading checks the rest of the config).
    pub fn new(c: &UNetConfig) -> Result<Self, String> {
        c.validate_layout()?;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let base = ch[0];
        let temb = 4 * base;
        let resnet = |i: usize, o: usize| ResnetConfig {
            in_channels: i,
            out_channels: o,
            temb_channels: Some(temb),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
        };
        let transformer = |level: usize| {
            let (channels, heads) = (ch[level], c.heads(level));
            Transformer2DConfig {
                in_channels: channels,
                heads,
                head_dim: channels / heads.max(1),
                context_dim: c.cross_attention_dim,
                layers: c.transformer_layers_per_block.get(level).unwrap_or(1),
                groups: c.norm_num_groups,
                use_linear_projection: c.use_linear_projection,
            }
        };
        let layers = c.layers_per_block;
        let down = (0..n)
            .map(|i| {
                let prev = if i == 0 { base } else { ch[i - 1] };
                DownLevel {
                    channels: ch[i],
                    resnets: (0..layers)
                        .map(|j| resnet(if j == 0 { prev } else { ch[i] }, ch[i]))
                        .collect(),
                    attentions: if c.down_has_attention(i) {
                        vec![transformer(i); layers]
                    } else {
                        Vec::new()
                    },
                    downsample_padding: (i + 1 < n).then_some(c.downsample_padding),
                }
            })
            .collect();
        let deepest = ch[n - 1];
        let mid = MidLevel {
            resnets: [resnet(deepest, deepest); 2],
            attention: transformer(n - 1),
        };
        // diffusers' channel rule: ResNet j of an up level takes the previous up level's width
        // (first) or its own, plus the skip: the next shallower level's width for the last,
        // its own for the others
        let mut prev_output = deepest;
        let up = (0..n)
            .map(|i| {
                let level = n - 1 - i;
                let out = ch[level];
                let shallower = ch[level.saturating_sub(1)];
                let skip_channels: Vec<usize> = (0..=layers)
                    .map(|j| if j == layers { shallower } else { out })
                    .collect();
                let resnets = (skip_channels.iter().enumerate())
                    .map(|(j, skip)| resnet(if j == 0 { prev_output } else { out } + skip, out))
                    .collect();
                prev_output = out;
                UpLevel {
                    level,
                    channels: out,
                    resnets,
                    skip_channels,
                    attentions: if c.down_has_attention(level) {
                        vec![transformer(level); layers + 1]
                    } else {
                        Vec::new()
                    },
                    upsample: i + 1 < n,
                }
            })
            .collect();
        Ok(Self {
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            base_channels: base,
            temb_channels: temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            down,
            mid,
            up,
        })
    }

    /// Levels (down blocks).
    pub fn levels(&self) -> usize {
        self.down.len()
    }

    /// What the latent height and width must be a multiple of (each level but the last halves
    /// them).
    pub fn size_multiple(&self) -> usize {
        1 << (self.levels() - 1)
    }

    /// Every transformer with its level, in module order (down, mid, up).
    pub fn transformers(&self) -> Vec<(usize, &Transformer2DConfig)> {
        let down = (self.down.iter().enumerate())
            .flat_map(|(level, d)| d.attentions.iter().map(move |t| (level, t)));
        let mid = std::iter::once((self.levels() - 1, &self.mid.attention));
        let up = (self.up.iter()).flat_map(|u| u.attentions.iter().map(move |t| (u.level, t)));
        down.chain(mid).chain(up).collect()
    }

    /// The diffusers path and weight shape of every linear (`[out, in]`) and convolution
    /// (`[out, in, kh, kw]`) layer, in module order: the layers LoRA and LoCon adapt, and
    /// what the memory estimate counts their adapters on.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let c0 = self.base_channels;
        let mut push = |name: String, shape: Vec<usize>| out.push((name, shape));
        push(
            "time_embedding.linear_1".into(),
            vec![self.temb_channels, c0],
        );
        push(
            "time_embedding.linear_2".into(),
            vec![self.temb_channels, self.temb_channels],
        );
        push("conv_in".into(), vec![c0, self.in_channels, 3, 3]);
        let resnet = |push: &mut dyn FnMut(String, Vec<usize>), p: &str, r: &ResnetConfig| {
            let (i, o) = (r.in_channels, r.out_channels);
            push(format!("{p}.conv1"), vec![o, i, 3, 3]);
            if let Some(t) = r.temb_channels {
                push(format!("{p}.time_emb_proj"), vec![o, t]);
            }
            push(format!("{p}.conv2"), vec![o, o, 3, 3]);
            if i != o {
                push(format!("{p}.conv_shortcut"), vec![o, i, 1, 1]);
            }
        };
        let transformer =
            |push: &mut dyn FnMut(String, Vec<usize>), p: &str, t: &Transformer2DConfig| {
                let (c, inner, ctx) = (t.in_channels, t.heads * t.head_dim, t.context_dim);
                let proj = |o: usize, i: usize| {
                    if t.use_linear_projection {
                        vec![o, i]
                    } else {
                        vec![o, i, 1, 1]
                    }
                };
                push(format!("{p}.proj_in"), proj(inner, c));
                for k in 0..t.layers {
                    let b = format!("{p}.transformer_blocks.{k}");
                    for (attn, kv) in [("attn1", inner), ("attn2", ctx)] {
                        push(format!("{b}.{attn}.to_q"), vec![inner, inner]);
                        push(format!("{b}.{attn}.to_k"), vec![inner, kv]);
                        push(format!("{b}.{attn}.to_v"), vec![inner, kv]);
                        push(format!("{b}.{attn}.to_out.0"), vec![inner, inner]);
                    }
                    push(format!("{b}.ff.net.0.proj"), vec![8 * inner, inner]);
                    push(format!("{b}.ff.net.2"), vec![inner, 4 * inner]);
                }
                push(format!("{p}.proj_out"), proj(c, inner));
            };
        for (i, d) in self.down.iter().enumerate() {
            for (j, r) in d.resnets.iter().enumerate() {
                resnet(&mut push, &format!("down_blocks.{i}.resnets.{j}"), r);
            }
            for (j, t) in d.attentions.iter().enumerate() {
                transformer(&mut push, &format!("down_blocks.{i}.attentions.{j}"), t);
            }
            if d.downsample_padding.is_some() {
                let c = d.channels;
                push(
                    format!("down_blocks.{i}.downsamplers.0.conv"),
                    vec![c, c, 3, 3],
                );
            }
        }
        resnet(&mut push, "mid_block.resnets.0", &self.mid.resnets[0]);
        transformer(&mut push, "mid_block.attentions.0", &self.mid.attention);
        resnet(&mut push, "mid_block.resnets.1", &self.mid.resnets[1]);
        for (i, u) in self.up.iter().enumerate() {
            for (j, r) in u.resnets.iter().enumerate() {
                resnet(&mut push, &format!("up_blocks.{i}.resnets.{j}"), r);
            }
            for (j, t) in u.attentions.iter().enumerate() {
                transformer(&mut push, &format!("up_blocks.{i}.attentions.{j}"), t);
            }
            if u.upsample {
                let c = u.channels;
                push(format!("up_blocks.{i}.upsamplers.0.conv"), vec![c, c, 3, 3]);
            }
        }
        push("conv_out".into(), vec![self.out_channels, c0, 3, 3]);
        out
    }

    /// The diffusers module path and the original (LDM) one of every module whose parameters
    /// are named differently in the two layouts, in module order.
    pub fn ldm_modules(&self) -> Vec<ModuleNames> {
        let mut out = Vec::new();
        let mut push = |diffusers: String, ldm: String, resnet: bool| {
            out.push(ModuleNames {
                diffusers,
                ldm,
                resnet,
            })
        };
        push(
            "time_embedding.linear_1".into(),
            "time_embed.0".into(),
            false,
        );
        push(
            "time_embedding.linear_2".into(),
            "time_embed.2".into(),
            false,
        );
        push("conv_in".into(), "input_blocks.0.0".into(), false);
        // LDM numbers the input blocks one per ResNet (with its transformer) and one per
        // downsampler, after conv_in's
        let mut k = 1;
        for (i, d) in self.down.iter().enumerate() {
            for j in 0..d.resnets.len() {
                let ours = format!("down_blocks.{i}");
                push(
                    format!("{ours}.resnets.{j}"),
                    format!("input_blocks.{k}.0"),
                    true,
                );
                if j < d.attentions.len() {
                    push(
                        format!("{ours}.attentions.{j}"),
                        format!("input_blocks.{k}.1"),
                        false,
                    );
                }
                k += 1;
            }
            if d.downsample_padding.is_some() {
                push(
                    format!("down_blocks.{i}.downsamplers.0.conv"),
                    format!("input_blocks.{k}.0.op"),
                    false,
                );
                k += 1;
            }
        }
        push("mid_block.resnets.0".into(), "middle_block.0".into(), true);
        push(
            "mid_block.attentions.0".into(),
            "middle_block.1".into(),
            false,
        );
        push("mid_block.resnets.1".into(), "middle_block.2".into(), true);
        // one output block per ResNet; the upsampler is the last module of the level's last
        let mut k = 0;
        for (i, u) in self.up.iter().enumerate() {
            for j in 0..u.resnets.len() {
                let ours = format!("up_blocks.{i}");
                push(
                    format!("{ours}.resnets.{j}"),
                    format!("output_blocks.{k}.0"),
                    true,
                );
                let attention = j < u.attentions.len();
                if attention {
                    push(
                        format!("{ours}.attentions.{j}"),
                        format!("output_blocks.{k}.1"),
                        false,
                    );
                }
                if u.upsample && j + 1 == u.resnets.len() {
                    let m = if attention { 2 } else { 1 };
                    push(
                        format!("{ours}.upsamplers.0"),
                        format!("output_blocks.{k}.{m}"),
                        false,
                    );
                }
                k += 1;
            }
        }
        push("conv_norm_out".into(), "out.0".into(), false);
        push("conv_out".into(), "out.2".into(), false);
        out
    }
}

/// One module's path in both layouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleNames {
    /// diffusers' path (`down_blocks.0.resnets.1`).
    pub diffusers: String,
    /// The original path (`input_blocks.2.0`).
    pub ldm: String,
    /// A ResNet, whose layers are named differently too (`in_layers.0` is `norm1`, see
    /// [`RESNET_LAYERS`]); other modules keep their inner names.
    pub resnet: bool,
}

/// A UNet ResNet's layers as `(LDM, diffusers)` names.
pub const RESNET_LAYERS: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];

/// The UNet tensor names of a plan in both layouts: the original (LDM/CompVis) single-file
/// keys (`input_blocks.1.0.in_layers.0.weight`, without `model.diffusion_model.`) and diffusers'
/// (`down_blocks.0.resnets.0.norm1.weight`), both ways.
#[derive(Debug, Clone)]
pub struct LdmKeys {
    /// LDM module path → (diffusers path, is a ResNet).
    from_ldm: HashMap<String, (String, bool)>,
    /// diffusers module path → (LDM path, is a ResNet).
    to_ldm: HashMap<String, (String, bool)>,
}

impl LdmKeys {
    /// The names of `plan`'s tensors.
    pub fn new(plan: &UNetPlan) -> Self {
        let modules = plan.ldm_modules();
        Self {
            from_ldm: (modules.iter())
                .map(|m| (m.ldm.clone(), (m.diffusers.clone(), m.resnet)))
                .collect(),
            to_ldm: (modules.into_iter())
                .map(|m| (m.diffusers, (m.ldm, m.resnet)))
                .collect(),
        }
    }

    /// The diffusers name of an LDM key (without its prefix); `None` for a key outside the
    /// plan.
    pub fn diffusers_name(&self, key: &str) -> Option<String> {
        translate(&self.from_ldm, key, |(ldm, ours)| (ldm, ours))
    }

    /// The LDM key (without its prefix) of a diffusers name: the inverse of
    /// [`Self::diffusers_name`]. `None` for a name outside the plan.
    pub fn ldm_key(&self, name: &str) -> Option<String> {
        translate(&self.to_ldm, name, |(ldm, ours)| (ours, ldm))
    }
}

/// Renames `name` by the longest module path of `modules` that it starts with; inside a ResNet
/// the layer is renamed by [`RESNET_LAYERS`] as `pair` orients them (from, to).
fn translate(
    modules: &HashMap<String, (String, bool)>,
    name: &str,
    pair: impl Fn((&'static str, &'static str)) -> (&'static str, &'static str),
) -> Option<String> {
    let mut end = name.len();
    while let Some(dot) = name[..end].rfind('.') {
        if let Some((module, resnet)) = modules.get(&name[..dot]) {
            let rest = &name[dot + 1..];
            if !resnet {
                return Some(format!("{module}.{rest}"));
            }
            return RESNET_LAYERS.iter().find_map(|&p| {
                let (from, to) = pair(p);
                let param = rest.strip_prefix(from)?.strip_prefix('.')?;
                Some(format!("{module}.{to}.{param}"))
            });
        }
        end = dot;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 1.5's plan has its published shape: 12 input blocks after conv_in, 12 output
    /// blocks, 16 transformers, and the skip widths diffusers' channel rule gives.
    #[test]
    fn sd15_plan() {
        let plan = UNetPlan::new(&UNetConfig::default()).unwrap();
        assert_eq!(plan.size_multiple(), 8);
        assert_eq!(plan.transformers().len(), 16);
        let skips: Vec<Vec<usize>> = plan.up.iter().map(|u| u.skip_channels.clone()).collect();
        assert_eq!(
            skips,
            [
                vec![1280, 1280, 1280],
                vec![1280, 1280, 640],
                vec![640, 640, 320],
                vec![320, 320, 320]
            ]
        );
        // the skips taken are the states the down path pushed, deepest first
        let mut pushed = vec![plan.base_channels];
        for d in &plan.down {
            pushed.extend(std::iter::repeat_n(d.channels, d.resnets.len()));
            if d.downsample_padding.is_some() {
                pushed.push(d.channels);
            }
        }
        pushed.reverse();
        let taken: Vec<usize> = skips.concat();
        assert_eq!(taken, pushed);
        assert_eq!(plan.up[0].resnets[0].in_channels, 2560);
        assert_eq!(plan.up[3].resnets[0].in_channels, 640 + 320);

        let keys = LdmKeys::new(&plan);
        for (ldm, ours) in [
            (
                "input_blocks.11.0.skip_connection.weight",
                "down_blocks.3.resnets.1.conv_shortcut.weight",
            ),
            (
                "input_blocks.9.0.op.bias",
                "down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.weight",
                "up_blocks.1.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.1.proj_in.weight",
                "up_blocks.1.attentions.2.proj_in.weight",
            ),
            (
                "middle_block.2.out_layers.3.bias",
                "mid_block.resnets.1.conv2.bias",
            ),
        ] {
            assert_eq!(keys.diffusers_name(ldm).as_deref(), Some(ours), "{ldm}");
            assert_eq!(keys.ldm_key(ours).as_deref(), Some(ldm), "{ours}");
        }
        // outside the plan: a fifth level, a third ResNet, an unknown ResNet layer
        assert_eq!(keys.diffusers_name("input_blocks.13.0.op.weight"), None);
        assert_eq!(keys.ldm_key("down_blocks.0.resnets.2.norm1.weight"), None);
        assert_eq!(keys.ldm_key("mid_block.resnets.0.nonsense.weight"), None);
    }
}
