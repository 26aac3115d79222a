//! TEMPORARY stand-in for `candle_bitnet::engine` (issue 14) with the API of
//! /work/notes/engine-api.md, one request at a time on `Generator`: lets the server and its
//! tests run before the batching engine lands. Deleted when it does.

use candle_bitnet::{Error, ErrorKind, GenerationParams, Generator};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

#[derive(Debug, Clone, Default)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub logprobs: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
    Cancelled,
}

pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

pub enum Event {
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
    Failed(Error),
}

pub struct EngineOptions {
    pub max_batch: usize,
    pub max_queue: usize,
}

pub struct EngineStats {
    pub queued: usize,
    pub running: usize,
    pub kv_tokens: usize,
    pub steps: u64,
}

pub type RequestId = u64;

type Sink = Box<dyn FnMut(Event) -> bool + Send>;

pub struct Engine {
    gen: Generator,
    opts: EngineOptions,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<(RequestId, Request, Sink)>,
    shared: Arc<Shared>,
    max_queue: usize,
}

#[derive(Default)]
struct Shared {
    queued: AtomicUsize,
    running: AtomicUsize,
    next_id: AtomicU64,
    cancelled: Mutex<HashSet<RequestId>>,
    shutdown: std::sync::atomic::AtomicBool,
}

impl Engine {
    pub fn new(gen: Generator, opts: EngineOptions) -> Engine {
        Engine { gen, opts }
    }

    pub fn spawn(self) -> EngineHandle {
        let (tx, rx) = mpsc::channel::<(RequestId, Request, Sink)>();
        let shared = Arc::new(Shared::default());
        let handle = EngineHandle {
            tx,
            shared: shared.clone(),
            max_queue: self.opts.max_queue,
        };
        let mut gen = self.gen;
        let _ = self.opts.max_batch;
        std::thread::spawn(move || {
            for (id, req, mut sink) in rx {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                shared.running.fetch_add(1, Ordering::SeqCst);
                let is_cancelled = || {
                    shared.shutdown.load(Ordering::SeqCst)
                        || shared.cancelled.lock().unwrap().contains(&id)
                };
                let defaults = gen.default_params();
                let params = GenerationParams {
                    max_tokens: req.max_tokens,
                    temperature: req.sampling.temperature,
                    top_k: req.sampling.top_k,
                    top_p: req.sampling.top_p,
                    min_p: req.sampling.min_p,
                    repeat_penalty: req.sampling.repeat_penalty,
                    repeat_last_n: req.sampling.repeat_last_n,
                    seed: Some(req.sampling.seed),
                    ignore_eos: req.stop_token_ids.is_empty(),
                    ..defaults
                };
                let mut gone = false;
                let out = gen.generate_ids(&req.prompt_ids, &params, |piece| {
                    if is_cancelled()
                        || !sink(Event::Token {
                            id: 0,
                            text: piece.to_string(),
                            logprob: None,
                        })
                    {
                        gone = true;
                        candle_core::bail!("cancelled")
                    }
                    Ok(())
                });
                let ev = match out {
                    Ok(g) => Event::Finished {
                        reason: if g.stop == candle_bitnet::generate::StopReason::Eos {
                            FinishReason::Eos
                        } else {
                            FinishReason::Length
                        },
                        text: String::new(),
                        usage: Usage {
                            prompt_tokens: g.prompt_ids.len(),
                            completion_tokens: g.generated_ids.len(),
                        },
                    },
                    Err(_) if gone => Event::Finished {
                        reason: FinishReason::Cancelled,
                        text: String::new(),
                        usage: Usage {
                            prompt_tokens: req.prompt_ids.len(),
                            completion_tokens: 0,
                        },
                    },
                    Err(e) => Event::Failed(e.into()),
                };
                sink(ev);
                shared.running.fetch_sub(1, Ordering::SeqCst);
                shared.cancelled.lock().unwrap().remove(&id);
            }
        });
        handle
    }
}

impl EngineHandle {
    pub fn submit(
        &self,
        req: Request,
        sink: impl FnMut(Event) -> bool + Send + 'static,
    ) -> Result<RequestId, Error> {
        if req.prompt_ids.is_empty() {
            return Err(Error::input("the prompt is empty"));
        }
        if self.shared.queued.load(Ordering::SeqCst) >= self.max_queue {
            return Err(Error::new(ErrorKind::Overloaded, "the queue is full"));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        self.tx
            .send((id, req, Box::new(sink)))
            .map_err(|_| Error::internal("the engine has stopped"))?;
        Ok(id)
    }

    pub fn cancel(&self, id: RequestId) {
        self.shared.cancelled.lock().unwrap().insert(id);
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            queued: self.shared.queued.load(Ordering::SeqCst),
            running: self.shared.running.load(Ordering::SeqCst),
            kv_tokens: 0,
            steps: 0,
        }
    }

    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
    }
}
