//! The residual block both the UNet and the VAE decoder are made of (diffusers'
//! `ResnetBlock2D`): group norm, SiLU, 3×3 convolution, plus the timestep embedding (the
//! UNet's), group norm, SiLU, 3×3 convolution, plus the input (through a 1×1 convolution when
//! the channels change), divided by the output scale. Ours rather than candle's so its
//! convolutions can run in bands ([`ConvPlan`]).

use candle_core::{D, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::conv::{Conv3x3, ConvPlan, Part};
use super::norm::{GroupNorm, group_norm};
use super::pointwise::Pointwise;
use super::weights::Linear;
use crate::engine::profile::{self, Work};

/// What the residual blocks of one model share.
#[derive(Clone, Copy, Debug)]
pub struct ResnetSettings {
    /// The timestep embedding's width (the UNet's blocks); `None`: no embedding (the VAE's).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    /// The model they are of, for their convolutions' kernel (raced per part).
    pub part: Part,
}

impl ResnetSettings {
    /// One block from `in_channels` to `out_channels`, its output divided by
    /// `output_scale_factor`.
    pub fn block(
        self,
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        output_scale_factor: f64,
    ) -> Result<Resnet> {
        Resnet::new(vb, self, in_channels, out_channels, output_scale_factor)
    }
}

pub struct Resnet {
    norm1: GroupNorm,
    conv1: Conv3x3,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv3x3,
    shortcut: Option<Pointwise>,
    output_scale_factor: f64,
}

impl Resnet {
    fn new(
        vb: VarBuilder,
        settings: ResnetSettings,
        in_channels: usize,
        out_channels: usize,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let ResnetSettings {
            temb_channels,
            groups,
            eps,
            part,
        } = settings;
        let shortcut = if in_channels == out_channels {
            None
        } else {
            Some(Pointwise::conv(
                vb.pp("conv_shortcut"),
                in_channels,
                out_channels,
            )?)
        };
        let time_emb_proj = match temb_channels {
            Some(temb_channels) => Some(Linear::new(
                vb.pp("time_emb_proj"),
                temb_channels,
                out_channels,
            )?),
            None => None,
        };
        Ok(Self {
            norm1: group_norm(groups, in_channels, eps, vb.pp("norm1"))?,
            conv1: Conv3x3::new(vb.pp("conv1"), in_channels, out_channels, part)?,
            time_emb_proj,
            norm2: group_norm(groups, out_channels, eps, vb.pp("norm2"))?,
            conv2: Conv3x3::new(vb.pp("conv2"), out_channels, out_channels, part)?,
            shortcut,
            output_scale_factor,
        })
    }

    /// `xs` `(batch, in, h, w)` → `(batch, out, h, w)`; `temb` `(batch, temb_channels)` where
    /// the block takes one.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>, plan: ConvPlan) -> Result<Tensor> {
        let mut hidden = self.conv1.forward_normalized(xs, &self.norm1, plan)?;
        if let (Some(projection), Some(temb)) = (&self.time_emb_proj, temb) {
            let added = projection
                .forward(&candle_nn::ops::silu(temb)?)?
                .unsqueeze(D::Minus1)?
                .unsqueeze(D::Minus1)?;
            hidden = hidden.broadcast_add(&added)?;
        }
        let hidden = self.conv2.forward_normalized(&hidden, &self.norm2, plan)?;
        let out = match &self.shortcut {
            Some(shortcut) => {
                (profile::timed(Work::Conv1x1, xs.device(), || shortcut.cells_to_cells(xs))?
                    + hidden)?
            }
            None => (xs + hidden)?,
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
