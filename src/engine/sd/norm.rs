//! The group norm layer of the UNet and the VAE decoder (diffusers' `GroupNorm`: tensors
//! `weight` and `bias`), with the SiLU that usually follows it fused in: one op of ours
//! ([`crate::engine::kernels::group_norm`]) instead of candle's composition.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::engine::kernels::{self, Activation};
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
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// `xs` `(batch, channels, …)` normalised.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, Activation::None)
    }

    /// `silu(self.forward(xs))`, in one pass.
    pub fn forward_then_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, Activation::Silu)
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
