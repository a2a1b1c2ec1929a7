//! The group norm layer of the UNet and the VAE decoder (diffusers' `GroupNorm`: tensors
//! `weight` and `bias`), with the SiLU that usually follows it fused in: one op of ours
//! ([`crate::engine::kernels::group_norm`]) instead of candle's composition.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::engine::kernels::{self, Activation, NormalizedImage};
use crate::engine::profile::{self, Work};

#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// A group norm over `channels` in `groups` groups, its weights from `vb` (1 and 0 where a
/// folder lacks them, as candle's).
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {groups} groups cannot divide {channels} channels");
    }
    GroupNorm::from_weights(
        vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
        vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
        groups,
        eps,
    )
}

impl GroupNorm {
    /// From a weight and bias `(channels,)` already in memory (the kernels bench's).
    pub fn from_weights(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.elem_count();
        if groups == 0 || !channels.is_multiple_of(groups) || bias.elem_count() != channels {
            candle_core::bail!(
                "GroupNorm: {groups} groups, {channels} weights and {} biases do not fit",
                bias.elem_count()
            );
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// `xs` `(batch, channels, …)` normalised.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, Activation::None)
    }

    /// `silu(self.forward(xs))`, in one pass.
    pub fn forward_then_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, Activation::Silu)
    }

    /// `xs` with its statistics taken, for a 3×3 convolution that reads it normalised and
    /// through SiLU (our convolution kernel, or its columns: [`kernels::norm_columns`]);
    /// `None` where our kernels do not run, and the caller normalises first.
    pub fn prepare_for_convolution(&self, xs: &Tensor) -> Result<Option<NormalizedImage>> {
        if xs.device().is_cpu() {
            // The CPU convolves the normalised image.
            return Ok(None);
        }
        // The statistics pass is the group norm's time; the normalising, the columns'.
        profile::timed(Work::GroupNorm, xs.device(), || {
            kernels::normalized_image(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                Activation::Silu,
            )
        })
    }

    fn run(&self, xs: &Tensor, activation: Activation) -> Result<Tensor> {
        profile::timed(Work::GroupNorm, xs.device(), || {
            kernels::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                activation,
            )
        })
    }
}
