//! Checks a folder's weights against its architecture without reading them: every tensor
//! each component needs must be in its `.safetensors` header with the right shape. Used
//! before a local folder is advertised (`models add`); costs a few kilobytes of reads.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Tensor names and shapes from a safetensors header.
struct HeaderShapes {
    shapes: HashMap<String, Vec<usize>>,
}

impl HeaderShapes {
    fn read(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let mut length = [0u8; 8];
        file.read_exact(&mut length)?;
        let length = u64::from_le_bytes(length);
        if length > 100 * 1024 * 1024 {
            candle_core::bail!(
                "{}: the safetensors header is implausibly large",
                path.display()
            );
        }
        let mut header = vec![0; length as usize];
        file.read_exact(&mut header)?;
        let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|error| candle_core::Error::Msg(format!("{}: {error}", path.display())))?;
        let shapes = header
            .into_iter()
            .filter(|(name, _)| name != "__metadata__")
            .filter_map(|(name, info)| {
                let shape = info
                    .get("shape")?
                    .as_array()?
                    .iter()
                    .map(|dim| dim.as_u64().map(|dim| dim as usize))
                    .collect::<Option<Vec<_>>>()?;
                Some((name, shape))
            })
            .collect();
        Ok(Self { shapes })
    }
}

impl SimpleBackend for HeaderShapes {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match self.shapes.get(name) {
            None => candle_core::bail!("the weights have no tensor {name}"),
            Some(found) if found.as_slice() != shape.dims() => candle_core::bail!(
                "tensor {name} has shape {found:?}, the architecture needs {:?}",
                shape.dims()
            ),
            // A stand-in that takes no memory.
            Some(_) => Tensor::zeros((), dtype, device)?.broadcast_as(shape),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        match self.shapes.get(name) {
            None => candle_core::bail!("the weights have no tensor {name}"),
            Some(shape) => Tensor::zeros((), dtype, device)?.broadcast_as(shape.as_slice()),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// A `VarBuilder` over the header of the safetensors file at `path`.
pub(super) fn header_builder(path: &Path) -> Result<VarBuilder<'static>> {
    let backend: Box<dyn SimpleBackend> = Box::new(HeaderShapes::read(path)?);
    Ok(VarBuilder::from_backend(backend, DType::F32, Device::Cpu))
}
