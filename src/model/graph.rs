//! Batch-1 decode on CUDA replayed from a CUDA graph: the layers' ~300 launches are captured
//! once per KV-cache capacity and replayed for each token, so the host issues one launch
//! instead of one per kernel (on the H200 machine of docs/benchmarks.md each op cost the host
//! ~6 µs to issue, more than its kernel ran: benches/decode_step.rs). The position and the
//! attention length sit in a small device buffer that each replay reads (the kernels take them
//! from there, `ops::decode::*_at`). The embedding lookup before the replay and the final norm
//! and head after it run launch by launch: candle's index_select and broadcast ops upload
//! their shapes from host memory, which a graph would read again, stale, at every replay. A
//! capture that fails leaves the cache on the launch-per-kernel path, with a warning.

use super::{BitnetModel, KvCache, SeqRows, Step};
use crate::ops::cuda::{capture_graph, u32_address};
use crate::profile::{timed, Stage};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{bail, DType, Device, Error, Result, Tensor};
use std::sync::{Arc, Mutex, OnceLock};

/// Set to `0` to decode on CUDA with a launch per kernel instead of a graph (comparisons); read
/// once, at the process's first CUDA decode step.
pub const CUDA_GRAPH_ENV: &str = "CANDLE_BITNET_CUDA_GRAPH";

/// [`CUDA_GRAPH_ENV`], read at the first step rather than at every token.
fn graphs_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(CUDA_GRAPH_ENV).map_or(true, |v| v != "0"))
}

/// A cache's captured step.
#[derive(Clone, Default)]
pub(super) enum GraphSlot {
    /// No step yet: the first one runs launch by launch, loading every kernel and table the
    /// capture then finds in place (loading them while capturing would record stale copies).
    #[default]
    Empty,
    Warm,
    Ready(Arc<DecodeGraph>),
    /// Capture failed once: this cache decodes launch by launch.
    Failed,
}

impl std::fmt::Debug for GraphSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GraphSlot::Empty => write!(f, "Empty"),
            GraphSlot::Warm => write!(f, "Warm"),
            GraphSlot::Ready(g) => write!(f, "Ready(capacity {})", g.capacity),
            GraphSlot::Failed => write!(f, "Failed"),
        }
    }
}

/// cudarc's graph is `!Send`: CUDA graphs must not be used from two threads at once, which the
/// mutex around it rules out.
struct Exec(CudaGraph);
// SAFETY: every use goes through `DecodeGraph::exec`'s mutex, one thread at a time.
unsafe impl Send for Exec {}

pub(super) struct DecodeGraph {
    /// The KV capacity the layers were captured for: the cache's buffers at that size.
    capacity: usize,
    exec: Mutex<Exec>,
    /// U32 `[position, position + 1]`, written before each replay.
    positions: Tensor,
    /// `(1, 1, hidden)`: the token's embedding, written before each replay.
    hidden_in: Tensor,
    /// `(1, 1, hidden)`: the last layer's output, written by each replay.
    hidden_out: Tensor,
}

impl BitnetModel {
    /// Whether [`Self::decode_graph`] takes a one-token step on `cache`: CUDA, device caches,
    /// every layer on the fused ops, no earlier failed capture, and not turned off by
    /// [`CUDA_GRAPH_ENV`].
    pub(super) fn decodes_with_graph(&self, cache: &KvCache) -> bool {
        self.device.is_cuda()
            && !cache.is_host()
            && !matches!(cache.graph, GraphSlot::Failed)
            && self.layers.iter().all(|l| l.can_fuse())
            && graphs_enabled()
    }

    /// The f32 logits `(vocab,)` of `id` at the cache's next position, its layers replayed from
    /// the captured graph (captured first when the cache has none for its capacity). `None`
    /// on a cache's first step and when the capture failed: the caller runs the step launch by
    /// launch.
    pub(super) fn decode_graph(&self, id: u32, cache: &mut KvCache) -> Result<Option<Tensor>> {
        self.check_input(&[id], cache)?;
        let pos = cache.len;
        let capacity = self.reserve_device_cache(cache, pos + 1)?;
        let graph = match &cache.graph {
            GraphSlot::Empty => {
                cache.graph = GraphSlot::Warm;
                return Ok(None);
            }
            GraphSlot::Ready(g) if g.capacity == capacity => g.clone(),
            _ => match self.capture(cache, capacity) {
                Ok(g) => {
                    let g = Arc::new(g);
                    cache.graph = GraphSlot::Ready(g.clone());
                    g
                }
                Err(e) => {
                    tracing::warn!("CUDA graph capture failed, decoding launch by launch: {e}");
                    cache.graph = GraphSlot::Failed;
                    return Ok(None);
                }
            },
        };
        let at = [pos as u32, pos as u32 + 1];
        graph
            .positions
            .slice_set(&Tensor::new(&at, &self.device)?, 0, 0)?;
        let x = self.embed_tokens.forward(vec![id], &self.device)?;
        graph.hidden_in.slice_set(&x.to_dtype(self.dtype)?, 0, 0)?;
        graph
            .exec
            .lock()
            .map_err(|_| Error::Msg("a CUDA graph's lock was poisoned".into()))?
            .0
            .launch()
            .map_err(Error::wrap)?;
        cache.len = pos + 1;
        let x = super::norm(&self.norm, &graph.hidden_out.squeeze(0)?)?;
        let logits = timed(Stage::Head, || self.project_to_vocab(&x))?;
        Ok(Some(logits.squeeze(0)?))
    }

    /// Grows every layer's device cache to hold `needed` positions; the common capacity.
    fn reserve_device_cache(&self, cache: &mut KvCache, needed: usize) -> Result<usize> {
        // Every path grows all layers together: the first one's capacity is theirs.
        if let Some(super::LayerKv::Device(Some(kv))) = cache.layers.first() {
            let capacity = kv.dim(2)?;
            if needed <= capacity {
                return Ok(capacity);
            }
        }
        let a = &self.layers[0].self_attn;
        let shape = (a.num_kv_heads, a.head_dim);
        let like = Tensor::zeros(1, self.dtype, &self.device)?;
        let mut capacity = None;
        for layer in 0..self.layers.len() {
            let kv = cache.device_layer(layer, needed, shape, &like)?;
            let c = kv.dim(2)?;
            if capacity.is_some_and(|other| other != c) {
                bail!("KV cache layers of different capacities ({c} and {capacity:?})")
            }
            capacity = Some(c);
        }
        capacity.ok_or_else(|| Error::Msg("a model without layers".into()))
    }

    /// Records the layers of one step on the device's stream and instantiates them. Nothing
    /// runs: the recorded kernels read their position from `positions` when replayed. Every
    /// buffer the layers allocate is freed inside the graph.
    fn capture(&self, cache: &mut KvCache, capacity: usize) -> Result<DecodeGraph> {
        let Device::Cuda(cuda) = &self.device else {
            bail!("CUDA graphs need a CUDA device")
        };
        let hidden = self.norm.weight().dim(0)?;
        let positions = Tensor::zeros(2, DType::U32, &self.device)?;
        let hidden_in = Tensor::zeros((1, 1, hidden), self.dtype, &self.device)?;
        let hidden_out = Tensor::zeros((1, 1, hidden), self.dtype, &self.device)?;
        let at = (u32_address(&positions, 0)?, u32_address(&positions, 1)?);
        // The cache's first step ran launch by launch: kernels loaded, pool memory at hand.
        let exec = capture_graph(cuda, || {
            self.record_layers(&hidden_in, &hidden_out, at, cache)
        })?;
        Ok(DecodeGraph {
            capacity,
            exec: Mutex::new(Exec(exec)),
            positions,
            hidden_in,
            hidden_out,
        })
    }

    fn record_layers(
        &self,
        hidden_in: &Tensor,
        hidden_out: &Tensor,
        positions: (u64, u64),
        cache: &mut KvCache,
    ) -> Result<()> {
        let step = Step {
            // The checks see the position of the capture; replays keep theirs below the
            // capacity (`decode_graph` captures again when the cache grows).
            seqs: vec![SeqRows {
                start: 0,
                len: 1,
                offset: cache.len,
            }],
            host: false,
            fused: true,
            cos: vec![],
            sin: vec![],
            positions: Some(positions),
        };
        let mut caches = [cache];
        let mut x = hidden_in.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &step, &mut caches, i)?;
        }
        hidden_out.slice_set(&x, 0, 0)
    }
}
