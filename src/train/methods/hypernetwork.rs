//! Hypernetwork inside the shared loop: f32 master networks, copies in the UNet's element
//! type hooked into its attentions for each micro-batch (with that micro-batch's dropout seed).

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;

use crate::diffusion::UNet;
use crate::diffusion::host_tensor::HostTensor;
use crate::diffusion::nn::Elem;
use crate::diffusion::schedulers::Ddpm;
use crate::formats::hypernetwork::{
    Hypernetwork, write_hypernetwork_pt, write_hypernetwork_safetensors,
};
use crate::train::batch::{Batch, mix};
use crate::train::hypernetwork::{HyperNet, apply_grads, install, param_grads};
use crate::train::mixed::{self, StepScaler};
use crate::train::optim::Optimizer;
use crate::train::resume::{self, TrainState};
use crate::train::run_loop::{TrainMethod, TrainStep};
use crate::train::text::TextInputs;

/// Hypernetwork: f32 master weights here, copies (in the UNet's element type) hooked into the
/// attentions for each micro-batch (with that micro-batch's dropout seed).
pub struct HyperSteps<'a, D: Device<f32> + Device<E>, E: Elem> {
    pub unet: &'a mut UNet<D, E>,
    pub ddpm: &'a Ddpm,
    /// The captions' frozen-encoder states.
    pub text: TextInputs<'a, D>,
    pub net: HyperNet<D>,
    pub optimizer: &'a mut Optimizer<D>,
    pub scratch: &'a Path,
    pub template: &'a Hypernetwork,
    pub seed: u64,
    /// Loss scaling (a fixed 1 in f32) and the step's overflow flag.
    pub scaler: StepScaler,
}

impl<D: Device<f32> + Device<E>, E: Elem> TrainStep<D> for HyperSteps<'_, D, E> {
    type Batch = Batch<D>;

    fn grads(&mut self, batch: &Batch<D>) -> anyhow::Result<(f32, BTreeMap<String, HostTensor>)> {
        let (step, micro) = (batch.step, batch.micro);
        // A1111 trains at multiplier 1, dropout on.
        let dropout_seed = mix(self.seed ^ 0xd80_9047, step, micro);
        let working = self.net.to_elem::<E>();
        install(self.unet, &[(&working, 1.0)], Some(dropout_seed))?;
        let context = self.text.batch_context(&batch.captions)?.to_dtype::<E>();
        let (loss, mut grads) = mixed::loss_and_grads(
            self.unet,
            self.ddpm,
            &batch.latents,
            &batch.noise,
            &batch.timesteps,
            &context,
            self.scaler.scale(),
        )?;
        let mut out = param_grads(&working, &mut grads)?;
        self.scaler.unscale(&mut out);
        Ok((loss, out))
    }

    fn apply(&mut self, grads: &BTreeMap<String, HostTensor>, lr: f64) -> anyhow::Result<()> {
        if !self.scaler.begin_update::<E>() {
            // an f16 overflow: the step is skipped with a smaller scale (GradScaler)
            return Ok(());
        }
        apply_grads(&mut self.net, grads, self.optimizer, lr)?;
        self.scaler.applied();
        Ok(())
    }
}

impl<D: Device<f32> + Device<E>, E: Elem> TrainMethod<D> for HyperSteps<'_, D, E> {
    fn checkpoint(&mut self, state: &TrainState) -> anyhow::Result<()> {
        let mut file = self.net.to_host(self.template);
        file.step = state.step;
        let mut state = state.clone();
        state.loss_scaler = self.scaler.saved::<E>();
        let state = &state;
        resume::save(self.scratch, state, |dir| {
            write_hypernetwork_safetensors(&dir.join("hypernetwork.safetensors"), &file)?;
            self.optimizer.save(&dir.join("optimizer.safetensors"))?;
            Ok(())
        })
    }

    fn write_artifact(
        &mut self,
        file: &Path,
        weights: Option<&BTreeMap<String, HostTensor>>,
        step: u64,
    ) -> anyhow::Result<()> {
        let mut net = self.net.clone();
        match weights {
            Some(w) => crate::train::hypernetwork::overwrite(&mut net, w)?,
            None => crate::train::hypernetwork::to_eval(&mut net, self.optimizer),
        }
        let mut trained = net.to_host(self.template);
        trained.step = step;
        Ok(write_hypernetwork_pt(file, &trained)?)
    }

    fn validation_loss(
        &mut self,
        items: &[crate::train::batch::Item],
        scaling: f32,
        seed: u64,
    ) -> anyhow::Result<f32> {
        // the current network, without dropout (each step installs its own copy again)
        install(self.unet, &[(&self.net.to_elem::<E>(), 1.0)], None)?;
        let text = &self.text;
        crate::train::eval::eval_loss_with(
            self.unet,
            self.ddpm,
            items,
            &mut |caption| text.batch_context(&[caption.to_string()]),
            scaling,
            seed,
        )
    }

    fn trained(&mut self) -> anyhow::Result<BTreeMap<String, HostTensor>> {
        Ok(crate::train::hypernetwork::named_values(&self.net))
    }
}
