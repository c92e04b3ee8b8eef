//! The host collective: the ranks are threads of this process and meet in
//! shared CPU memory. Each call is a rendezvous in two phases under one
//! mutex: every rank deposits its buffer, the last to arrive combines them
//! (a sum in rank order, so every run adds the same floats in the same
//! order, or the root's buffer), then every rank copies the result out and
//! the last to do so opens the next call. Tensors on another device are
//! copied to the CPU and back.
//!
//! A rank that aborts, or drops its handle without leaving, breaks the
//! group: waiting ranks wake up and fail, and so does every later call. A
//! rank waits at most the group's timeout for the others.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use super::{Collective, CollectiveError};

/// What the ranks of one call combine their buffers into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Sum,
    Broadcast(usize),
    Barrier,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Ranks deposit their buffers.
    Gather,
    /// The result is ready; ranks copy it out.
    Scatter,
}

struct State {
    phase: Phase,
    /// Which call this is, counted from 0: a rank that copied the result out
    /// waits for the next one to open before depositing again.
    call: u64,
    op: Option<Op>,
    deposits: Vec<Option<Vec<f32>>>,
    arrived: usize,
    result: Arc<Vec<f32>>,
    departed: usize,
    /// Why the group is broken: the rank and its reason.
    broken: Option<(usize, String)>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

/// A group of in-process ranks; [`HostGroup::new`] hands out one handle per
/// rank, to be moved to the rank's thread.
pub struct HostGroup;

impl HostGroup {
    /// Handles of a group of `world` ranks whose calls wait at most `timeout`
    /// for the other ranks.
    pub fn new(world: usize, timeout: Duration) -> Vec<HostCollective> {
        assert!(world > 0, "a group has at least one rank");
        let state = State {
            phase: Phase::Gather,
            call: 0,
            op: None,
            deposits: vec![None; world],
            arrived: 0,
            result: Arc::new(Vec::new()),
            departed: 0,
            broken: None,
        };
        let shared = Arc::new(Shared { world, timeout, state: Mutex::new(state), changed: Condvar::new() });
        (0..world).map(|rank| HostCollective { rank, shared: shared.clone(), left: false }).collect()
    }
}

/// One rank's handle on a [`HostGroup`].
pub struct HostCollective {
    rank: usize,
    shared: Arc<Shared>,
    left: bool,
}

impl HostCollective {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock broke the group first.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, state: &State) -> Result<(), CollectiveError> {
        match &state.broken {
            Some((rank, reason)) => Err(CollectiveError::PeerFailed { rank: *rank, reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// Waits on the condition variable until `ready`, the group breaks, or
    /// `deadline` passes.
    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        deadline: Instant,
        ready: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, CollectiveError> {
        loop {
            self.check(&state)?;
            if ready(&state) {
                return Ok(state);
            }
            let now = Instant::now();
            if now >= deadline {
                let error = CollectiveError::Timeout { rank: self.rank, seconds: self.shared.timeout.as_secs() };
                state.broken.get_or_insert((self.rank, error.to_string()));
                self.shared.changed.notify_all();
                return Err(error);
            }
            state = self.shared.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// One call: deposits `data`, waits for every rank's, and returns the
    /// combined result.
    fn exchange(&self, op: Op, data: Vec<f32>) -> Result<Arc<Vec<f32>>, CollectiveError> {
        let deadline = Instant::now() + self.shared.timeout;
        let state = self.lock();
        // Wait for the previous call to be copied out by everyone.
        let mut state = self.wait_until(state, deadline, |s| s.phase == Phase::Gather)?;
        match state.op {
            Some(other) if other != op => {
                let error = CollectiveError::Mismatch(format!("rank {} called {op:?} while others called {other:?}", self.rank));
                state.broken.get_or_insert((self.rank, error.to_string()));
                self.shared.changed.notify_all();
                return Err(error);
            }
            _ => state.op = Some(op),
        }
        state.deposits[self.rank] = Some(data);
        state.arrived += 1;
        let call = state.call;
        if state.arrived == self.shared.world {
            let deposits: Vec<Vec<f32>> = state.deposits.iter_mut().map(|d| d.take().unwrap_or_default()).collect();
            match combine(op, deposits) {
                Ok(result) => state.result = Arc::new(result),
                Err(error) => {
                    state.broken.get_or_insert((self.rank, error.to_string()));
                    self.shared.changed.notify_all();
                    return Err(error);
                }
            }
            state.phase = Phase::Scatter;
            self.shared.changed.notify_all();
        }
        let mut state = self.wait_until(state, deadline, |s| s.phase == Phase::Scatter && s.call == call)?;
        let result = state.result.clone();
        state.departed += 1;
        if state.departed == self.shared.world {
            state.phase = Phase::Gather;
            state.call += 1;
            state.op = None;
            state.arrived = 0;
            state.departed = 0;
            self.shared.changed.notify_all();
        }
        Ok(result)
    }

    fn break_group(&self, reason: &str) {
        let mut state = self.lock();
        state.broken.get_or_insert((self.rank, reason.to_string()));
        self.shared.changed.notify_all();
    }
}

/// The result of one call from every rank's deposit, in rank order.
fn combine(op: Op, deposits: Vec<Vec<f32>>) -> Result<Vec<f32>, CollectiveError> {
    match op {
        Op::Barrier => Ok(Vec::new()),
        Op::Broadcast(root) => {
            let len = deposits[root].len();
            if let Some(rank) = deposits.iter().position(|d| d.len() != len) {
                return Err(CollectiveError::Mismatch(format!("rank {rank} broadcast into a buffer of another length")));
            }
            Ok(deposits.into_iter().nth(root).unwrap_or_default())
        }
        Op::Sum => {
            let mut ranks = deposits.into_iter();
            let mut sum = ranks.next().unwrap_or_default();
            for (rank, deposit) in ranks.enumerate() {
                if deposit.len() != sum.len() {
                    return Err(CollectiveError::Mismatch(format!(
                        "rank {} reduced {} values, rank 0 {}",
                        rank + 1,
                        deposit.len(),
                        sum.len()
                    )));
                }
                sum.iter_mut().zip(&deposit).for_each(|(total, value)| *total += value);
            }
            Ok(sum)
        }
    }
}

/// The values of a flat float32 buffer.
fn values(buffer: &Tensor) -> Result<Vec<f32>, CollectiveError> {
    if buffer.kind() != Kind::Float || buffer.dim() != 1 {
        return Err(CollectiveError::Mismatch(format!("a buffer is one flat float32 tensor, got {:?} {:?}", buffer.kind(), buffer.size())));
    }
    Vec::<f32>::try_from(buffer.to_device(tch::Device::Cpu)).map_err(|e| CollectiveError::Backend(e.to_string()))
}

/// Writes `result` into `buffer`, on its device.
fn write_back(buffer: &mut Tensor, result: &[f32]) {
    let host = Tensor::from_slice(result).to_device(buffer.device());
    tch::no_grad(|| buffer.copy_(&host));
}

impl Collective for HostCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, buffer: &mut Tensor) -> Result<(), CollectiveError> {
        let result = self.exchange(Op::Sum, values(buffer)?)?;
        write_back(buffer, &result);
        Ok(())
    }

    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if root >= self.shared.world {
            return Err(CollectiveError::Mismatch(format!("broadcast from rank {root} in a group of {}", self.shared.world)));
        }
        let result = self.exchange(Op::Broadcast(root), values(buffer)?)?;
        if self.rank != root {
            write_back(buffer, &result);
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.exchange(Op::Barrier, Vec::new()).map(drop)
    }

    fn abort(&mut self, reason: &str) {
        self.break_group(reason);
    }

    fn leave(mut self: Box<Self>) {
        self.left = true;
    }
}

impl Drop for HostCollective {
    fn drop(&mut self) {
        if !self.left {
            let reason = if std::thread::panicking() { "it panicked" } else { "it stopped before the others" };
            self.break_group(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(600);

    /// Three threads sum their buffers: every rank gets the same sum, call
    /// after call, and a broadcast gives every rank the root's buffer.
    #[test]
    fn three_ranks_sum_and_broadcast() {
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = HostGroup::new(3, LONG)
                .into_iter()
                .map(|mut rank| {
                    scope.spawn(move || {
                        let r = rank.rank() as f32;
                        let mut sums = Vec::new();
                        for call in 0..5 {
                            let mut buffer = Tensor::from_slice(&[r, 10.0 * r, call as f32]);
                            rank.all_reduce_sum(&mut buffer).unwrap();
                            sums.extend(Vec::<f32>::try_from(&buffer).unwrap());
                        }
                        let mut buffer = Tensor::from_slice(&[r + 1.0, -r]);
                        rank.broadcast(&mut buffer, 2).unwrap();
                        rank.barrier().unwrap();
                        Box::new(rank).leave();
                        (sums, Vec::<f32>::try_from(&buffer).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected: Vec<f32> = (0..5).flat_map(|call| [3.0, 30.0, 3.0 * call as f32]).collect();
        for (sums, broadcast) in results {
            assert_eq!(sums, expected);
            assert_eq!(broadcast, vec![3.0, -2.0]);
        }
    }

    /// A rank that drops its handle (as a failing or panicking rank does)
    /// makes the others' calls fail, whether they already wait or call
    /// later; they do not hang until the timeout.
    #[test]
    fn a_dropped_rank_fails_the_others() {
        let errors: Vec<CollectiveError> = std::thread::scope(|scope| {
            let mut ranks = HostGroup::new(3, LONG).into_iter();
            let dying = ranks.next().unwrap();
            let handles: Vec<_> = ranks
                .map(|mut rank| {
                    scope.spawn(move || {
                        let mut buffer = Tensor::from_slice(&[1.0f32]);
                        // The first sum waits for rank 0, which never comes.
                        let first = rank.all_reduce_sum(&mut buffer).unwrap_err();
                        let later = rank.barrier().unwrap_err();
                        assert_eq!(first, later);
                        first
                    })
                })
                .collect();
            drop(dying);
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for error in errors {
            assert_eq!(error, CollectiveError::PeerFailed { rank: 0, reason: "it stopped before the others".into() });
        }
    }

    /// A rank that never arrives fails the waiting ones at the timeout, and
    /// the group stays broken for the latecomer.
    #[test]
    fn a_missing_rank_times_out() {
        let mut ranks = HostGroup::new(2, Duration::from_millis(20));
        let mut late = ranks.pop().unwrap();
        let mut early = ranks.pop().unwrap();
        let error = early.barrier().unwrap_err();
        assert_eq!(error, CollectiveError::Timeout { rank: 0, seconds: 0 });
        assert!(matches!(late.barrier(), Err(CollectiveError::PeerFailed { rank: 0, .. })));
    }
}
