//! Whether a `train` stage's parameters can train, checked at their keys before anything runs.

use super::{Method, TrainParams, schedule};
use crate::diffusion::schedulers::PredictionType;
use crate::stages::{ParamError, checks};
use crate::train::optim::OptimizerKind;
use crate::train::timesteps::{TimestepBias, TimestepDistribution};

/// Why zero terminal SNR needs v-prediction, for the errors that refuse it.
pub(super) const ZERO_SNR_NEEDS_V: &str = "with zero terminal SNR the last timestep is pure \
     noise, so a model predicting the noise learns nothing about the image there and sampling \
     divides by ᾱ = 0 (Lin et al. 2023, §3.2)";

impl TrainParams {
    /// The LyCORIS keys: `lora.factor` only for LoKr (-1 or a positive factor); no adapter
    /// dropout for the methods that act through a full-size ΔW.
    fn validate_lycoris(&self) -> Result<(), ParamError> {
        let name = serde_json::to_value(self.method)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        if self.lora.factor != -1 {
            if self.method != Method::Lokr {
                return Err(ParamError::new(
                    "lora.factor",
                    format!(
                        "lora.factor splits LoKr's Kronecker factors, and method = \"{name}\" has none"
                    ),
                    "set method = \"lokr\", or leave lora.factor out",
                ));
            }
            if self.lora.factor < 1 {
                return Err(ParamError::new(
                    "lora.factor",
                    format!(
                        "lora.factor = {} is neither -1 nor a positive factor",
                        self.lora.factor
                    ),
                    "-1 (the default) splits each dimension as close to a square as possible; \
                     a factor f splits it into f × rest, as LyCORIS' `factor` does (4 or 8 are common)",
                ));
            }
        }
        if self.lora.dropout > 0.0
            && matches!(self.method, Method::Loha | Method::Lokr | Method::Dora)
        {
            return Err(ParamError::new(
                "lora.dropout",
                format!(
                    "lora.dropout drops a LoRA adapter's input, and method = \"{name}\" acts \
                     through a full-size weight update instead (LyCORIS has no dropout for it either)"
                ),
                "leave lora.dropout out, or use method = \"lora\" or \"locon\"",
            ));
        }
        Ok(())
    }

    /// `prediction_type` and `zero_terminal_snr`: x₀-prediction is not a training target, and
    /// an explicit ε-prediction cannot go with zero terminal SNR (a base model's own ε is
    /// refused when the run loads it).
    fn validate_parameterization(&self) -> Result<(), ParamError> {
        match self.prediction_type {
            Some(PredictionType::Sample) => Err(ParamError::new(
                "prediction_type",
                "x₀-prediction (\"sample\") is not a training target here",
                "use \"epsilon\" or \"v_prediction\", as diffusers' training scripts do",
            )),
            Some(PredictionType::Epsilon) if self.zero_terminal_snr => Err(ParamError::new(
                "zero_terminal_snr",
                format!("zero_terminal_snr needs v-prediction: {ZERO_SNR_NEEDS_V}"),
                "set prediction_type = \"v_prediction\"",
            )),
            _ => Ok(()),
        }
    }

    /// The caption keys: rates in [0, 1), and the keys that only mean something beside
    /// another name it.
    fn validate_captions(&self) -> Result<(), ParamError> {
        for (key, rate, hint) in [
            (
                "caption_dropout",
                self.caption_dropout,
                "the share of captions trained as empty; 0.05-0.1 is usual",
            ),
            (
                "caption_tag_dropout",
                self.caption_tag_dropout,
                "each tag's chance to be left out; 0.1 is usual",
            ),
        ] {
            if let Some(r) = rate
                && !(0.0..1.0).contains(&r)
            {
                return Err(ParamError::new(key, format!("{r} is not in [0, 1)"), hint));
            }
        }
        let splits = self.shuffle_caption || self.caption_tag_dropout.is_some();
        for (key, set) in [
            ("keep_tokens", self.keep_tokens.is_some()),
            ("caption_separator", self.caption_separator.is_some()),
        ] {
            if set && !splits {
                return Err(ParamError::new(
                    key,
                    format!(
                        "{key} applies to the tags shuffle_caption or caption_tag_dropout work on, and neither is set"
                    ),
                    "set shuffle_caption = true (or caption_tag_dropout), or leave the key out",
                ));
            }
        }
        if self.caption_separator.as_deref().is_some_and(str::is_empty) {
            return Err(ParamError::new(
                "caption_separator",
                "the separator is empty",
                "kohya's default is \",\"",
            ));
        }
        Ok(())
    }

    /// `optimizer`: schedule-free AdamW runs at a constant rate (after an optional warm-up).
    /// Prodigy estimates one step size for every parameter, so (as prodigyopt,
    /// which refuses parameter groups at different rates) the text encoder cannot train at its
    /// own rate.
    fn validate_optimizer(&self) -> Result<(), ParamError> {
        // Schedule-free AdamW replaces the schedule (Defazio et al. 2024): its package allows
        // a warm-up, nothing that decays the rate.
        if self.optimizer == OptimizerKind::ScheduleFreeAdamW
            && !matches!(
                self.lr_scheduler.as_str(),
                "constant" | "constant_with_warmup"
            )
        {
            return Err(ParamError::new(
                "lr_scheduler",
                format!(
                    "schedule-free AdamW needs no schedule, and `{}` decays the rate on top of it",
                    self.lr_scheduler
                ),
                "use lr_scheduler = \"constant\" (or \"constant_with_warmup\")",
            ));
        }
        if self.optimizer != OptimizerKind::Prodigy {
            return Ok(());
        }
        for (key, te_lr) in [
            ("lora.text_encoder_lr", self.lora.text_encoder_lr),
            (
                "dreambooth.text_encoder_lr",
                self.dreambooth.text_encoder_lr,
            ),
        ] {
            if let Some(te_lr) = te_lr
                && te_lr != self.lr
                && te_lr != 0.0
            {
                return Err(ParamError::new(
                    "optimizer",
                    format!(
                        "Prodigy estimates one step size for all parameters; `{key}` = {te_lr} \
                         differs from lr = {}",
                        self.lr
                    ),
                    format!(
                        "leave `{key}` out (with Prodigy set lr = 1.0), or pick another optimizer"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `ema_decay` in (0, 1); `ema_warmup` only beside it; not with schedule-free AdamW,
    /// whose evaluation point is already an average of the iterates.
    fn validate_ema(&self) -> Result<(), ParamError> {
        match self.ema_decay {
            None if self.ema_warmup => Err(ParamError::new(
                "ema_warmup",
                "ema_warmup shapes the EMA's decay, and ema_decay is not set",
                "set ema_decay too, e.g. ema_decay = 0.999",
            )),
            Some(d) if !(d > 0.0 && d < 1.0) => Err(ParamError::new(
                "ema_decay",
                format!("{d} is not in (0, 1)"),
                "0.999 suits a few hundred steps, 0.9999 long runs",
            )),
            Some(_) if self.optimizer == OptimizerKind::ScheduleFreeAdamW => Err(ParamError::new(
                "ema_decay",
                "schedule-free AdamW already evaluates an average of its iterates",
                "leave ema_decay out, or pick another optimizer",
            )),
            _ => Ok(()),
        }
    }

    pub(in crate::stages) fn validate(&self) -> Result<(), ParamError> {
        if self.steps == 0 {
            return Err(ParamError::new(
                "steps",
                "steps must be positive",
                "e.g. steps = 500",
            ));
        }
        if self.batch_size == 0 {
            return Err(ParamError::new(
                "batch_size",
                "batch_size must be positive",
                "e.g. batch_size = 1",
            ));
        }
        if self.gradient_accumulation == 0 {
            return Err(ParamError::new(
                "gradient_accumulation",
                "gradient_accumulation must be positive",
                "1 means none",
            ));
        }
        checks::learning_rate("lr", self.lr, "LoRA typically uses 1e-4")?;
        for (key, lr) in [
            ("lora.lr", self.lora.lr),
            ("textual_inversion.lr", self.textual_inversion.lr),
            ("dreambooth.lr", self.dreambooth.lr),
            ("hypernetwork.lr", self.hypernetwork.lr),
        ] {
            if let Some(lr) = lr {
                checks::learning_rate(
                    key,
                    lr,
                    "it overrides the stage's `lr` for that method; e.g. 5e-3",
                )?;
            }
        }
        checks::non_negative(
            "weight_decay",
            self.weight_decay,
            "the optimiser's weight decay; 1e-2 is the default, 0 turns it off",
        )?;
        self.validate_optimizer()?;
        checks::non_negative(
            "max_grad_norm",
            self.max_grad_norm,
            "the global gradient norm is clipped to it; 1.0 is the default, 0 turns clipping off",
        )?;
        if let Some(gamma) = self.min_snr_gamma {
            checks::non_negative(
                "min_snr_gamma",
                gamma,
                "the SNR at which weights are clipped; 5 is the paper's and kohya's usual value, \
                 0 turns it off (as in kohya)",
            )?;
        }
        if let Some(offset) = self.noise_offset {
            checks::non_negative(
                "noise_offset",
                offset,
                "each noise plane's shift; 0.05-0.1 is usual, 0 turns it off",
            )?;
        }
        if let Some(scale) = self.adaptive_noise_scale {
            if self.noise_offset.is_none() {
                return Err(ParamError::new(
                    "adaptive_noise_scale",
                    "adaptive_noise_scale scales the noise offset, and noise_offset is not set",
                    "set noise_offset too, e.g. noise_offset = 0.05",
                ));
            }
            if !scale.is_finite() {
                return Err(ParamError::new(
                    "adaptive_noise_scale",
                    format!("{scale} is not a finite number"),
                    "kohya suggests about a tenth of noise_offset's value, e.g. 0.005",
                ));
            }
        }
        if let Some(n) = self.multires_noise_iterations
            && !(1..=20).contains(&n)
        {
            return Err(ParamError::new(
                "multires_noise_iterations",
                format!("{n} levels; the pyramid needs 1 to 20"),
                "6-10 is usual; leave the key out to turn pyramid noise off",
            ));
        }
        if self.multires_noise_discount.is_some() && self.multires_noise_iterations.is_none() {
            return Err(ParamError::new(
                "multires_noise_discount",
                "multires_noise_discount weighs the pyramid's levels, and multires_noise_iterations is not set",
                "set multires_noise_iterations too, e.g. 6",
            ));
        }
        if let Some(d) = self.multires_noise_discount
            && !(d > 0.0 && d <= 1.0)
        {
            return Err(ParamError::new(
                "multires_noise_discount",
                format!("{d} is not in (0, 1]"),
                "each coarser level weighs discount^i; 0.3 is kohya's default",
            ));
        }
        self.validate_timestep_sampling()?;
        self.validate_captions()?;
        self.validate_ema()?;
        if let Some(share) = self.validation_split
            && !(share > 0.0 && share < 1.0)
        {
            return Err(ParamError::new(
                "validation_split",
                format!("{share} is not in (0, 1)"),
                "the share of images held out for the validation loss, e.g. 0.1",
            ));
        }
        match (self.validate_every, self.validation_split) {
            (Some(0), _) => {
                return Err(ParamError::new(
                    "validate_every",
                    "validate_every must be positive",
                    "e.g. a tenth of `steps`",
                ));
            }
            (Some(_), None) => {
                return Err(ParamError::new(
                    "validate_every",
                    "validate_every computes the loss of held-out images, and validation_split is not set",
                    "set validation_split too, e.g. validation_split = 0.1",
                ));
            }
            _ => {}
        }
        if let Some(every) = self.save_every
            && (every == 0 || every >= self.steps)
        {
            return Err(ParamError::new(
                "save_every",
                format!(
                    "save_every = {every} saves nothing before the last of {} steps",
                    self.steps
                ),
                "pick a step count below `steps`, e.g. a quarter of it",
            ));
        }
        self.validate_parameterization()?;
        if self.min_timestep >= self.max_timestep || self.max_timestep > 1000 {
            return Err(ParamError::new(
                "max_timestep",
                format!(
                    "the timestep range {}..{} is empty or beyond 1000",
                    self.min_timestep, self.max_timestep
                ),
                "use 0 <= min_timestep < max_timestep <= 1000",
            ));
        }
        if let Err(e) = schedule(self) {
            return Err(ParamError::new(
                "lr_scheduler",
                e,
                "constant, constant_with_warmup, cosine, linear, or \"1e-3:100, 1e-4\"",
            ));
        }
        if self.method == Method::TextualInversion {
            let ti = &self.textual_inversion;
            if ti.token.as_deref().is_none_or(|t| t.trim().is_empty()) {
                return Err(ParamError::new(
                    "textual_inversion.token",
                    "textual inversion needs a `token`",
                    "add [stage.NAME.textual_inversion] token = \"zorb\" (the word your captions use)",
                ));
            }
            if ti.num_vectors == 0 || ti.num_vectors > 75 {
                return Err(ParamError::new(
                    "textual_inversion.num_vectors",
                    "num_vectors must be 1..=75",
                    "1 to 8 are common",
                ));
            }
            if ti.init_word.trim().is_empty() {
                return Err(ParamError::new(
                    "textual_inversion.init_word",
                    "init_word is empty",
                    "e.g. init_word = \"star\"",
                ));
            }
        }
        if self.method == Method::Dreambooth {
            self.validate_dreambooth()?;
        }
        if self.method == Method::Hypernetwork {
            self.hypernetwork.validate()?;
        }
        if self.lora.rank == 0 {
            return Err(ParamError::new(
                "lora.rank",
                "lora.rank must be positive",
                "4 to 128 are common",
            ));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err(ParamError::new(
                "lora.dropout",
                format!("dropout {} is outside [0, 1)", self.lora.dropout),
                "0.1 is a common value; 0 turns it off",
            ));
        }
        if self.lora.text_encoder && self.lora.text_encoder_targets.is_empty() {
            return Err(ParamError::new(
                "lora.text_encoder_targets",
                "lora.text_encoder_targets is empty",
                "the default is [\"q_proj\", \"k_proj\", \"v_proj\", \"out_proj\"]",
            ));
        }
        self.validate_lycoris()?;
        if let Some(alpha) = self.lora.alpha {
            checks::positive(
                "lora.alpha",
                f64::from(alpha),
                "the update is scaled by alpha / rank: alpha = rank (the default) gives 1, kohya \
                 users often take alpha = 1 or rank / 2",
            )?;
        }
        if let Some(lr) = self.lora.text_encoder_lr {
            checks::learning_rate(
                "lora.text_encoder_lr",
                lr,
                "kohya users often take half the UNet's rate, e.g. 5e-5",
            )?;
        }
        if self.lora.targets.is_empty() {
            return Err(ParamError::new(
                "lora.targets",
                "lora.targets is empty",
                "the default is [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]",
            ));
        }
        Ok(())
    }

    /// `timestep_sampling` and the keys that only mean something beside one of its values.
    fn validate_timestep_sampling(&self) -> Result<(), ParamError> {
        let logit = self.timestep_sampling == Some(TimestepDistribution::LogitNormal);
        for (key, set) in [
            ("logit_mean", self.logit_mean.is_some()),
            ("logit_std", self.logit_std.is_some()),
        ] {
            if set && !logit {
                return Err(ParamError::new(
                    key,
                    format!(
                        "{key} shapes the logit-normal draw, and timestep_sampling is not \"logit_normal\""
                    ),
                    "set timestep_sampling = \"logit_normal\" or leave the key out",
                ));
            }
        }
        if let Some(std) = self.logit_std {
            checks::positive("logit_std", std, "1.0 is SD3's default")?;
        }
        if let Some(mean) = self.logit_mean
            && !mean.is_finite()
        {
            return Err(ParamError::new(
                "logit_mean",
                format!("{mean} is not a finite number"),
                "0 centres the draw on the middle timestep",
            ));
        }
        let biased = matches!(
            self.timestep_bias,
            Some(TimestepBias::High | TimestepBias::Low)
        );
        if biased && logit {
            return Err(ParamError::new(
                "timestep_bias",
                "a bias applies to the uniform draw, and timestep_sampling is \"logit_normal\"",
                "use one of the two",
            ));
        }
        for (key, set) in [
            (
                "timestep_bias_multiplier",
                self.timestep_bias_multiplier.is_some(),
            ),
            (
                "timestep_bias_portion",
                self.timestep_bias_portion.is_some(),
            ),
        ] {
            if set && !biased {
                return Err(ParamError::new(
                    key,
                    format!("{key} sizes the timestep bias, and timestep_bias is not set"),
                    "set timestep_bias = \"high\" or \"low\" too",
                ));
            }
        }
        if let Some(m) = self.timestep_bias_multiplier {
            checks::positive(
                "timestep_bias_multiplier",
                m,
                "how many times likelier the biased end is; 2.0 is the default",
            )?;
        }
        if let Some(p) = self.timestep_bias_portion
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ParamError::new(
                "timestep_bias_portion",
                format!("{p} is not in (0, 1]"),
                "the share of the range that is biased; 0.25 is diffusers' default",
            ));
        }
        Ok(())
    }

    fn validate_dreambooth(&self) -> Result<(), ParamError> {
        checks::non_negative(
            "dreambooth.prior_loss_weight",
            self.dreambooth.prior_loss_weight,
            "1.0 is diffusers' default; 0 turns prior preservation off",
        )?;
        if let Some(lr) = self.dreambooth.text_encoder_lr {
            checks::learning_rate(
                "dreambooth.text_encoder_lr",
                lr,
                "e.g. the UNet's rate, or half of it",
            )?;
        }
        Ok(())
    }
}
