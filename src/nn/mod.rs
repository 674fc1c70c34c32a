//! Layers and building blocks: flat parameter storage, Conv2d/BatchNorm2d/Linear, the
//! re-parameterizable conv, and the Ghost module/bottleneck.

pub mod ghost;
pub mod layers;
pub mod params;
pub mod rep_conv;

pub use layers::{BatchNorm2d, Conv2d, ConvBn, Ctx, Linear, Mode, ParamLeaves};
pub use params::{Builder, FlatStore, Id, State};
pub use rep_conv::{RepConv, RepForm, RepOptions};
