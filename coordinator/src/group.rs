//! Group commit: calls from many workers that each write a little (a step
//! report, a completion) are written together, several in one transaction,
//! instead of one transaction each.
//!
//! A call adds its item to the group's queue and then either gets its
//! answer or a turn to write: a turn takes what is queued (in arrival order,
//! up to a weight limit, passing over items that name a key already taken)
//! and writes it in a task of its own, so a caller that goes away never
//! cuts short the others' write. At most `writers` turns run at once; while
//! they run, the next calls queue up and go together in the next turn. A
//! lone call is written at once, waiting for nothing.
//!
//! The write answers each item; it is the owner's to keep one bad item from
//! failing the others (write them one by one when the whole group fails).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Semaphore};
use uuid::Uuid;

/// Writes a turn's items and answers each, in their order.
pub type Write<T, R> = Arc<dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Vec<R>> + Send>> + Send + Sync>;

/// A queue of items written together, cheap to clone.
pub struct Group<T, R> {
    inner: Arc<Inner<T, R>>,
}

impl<T, R> Clone for Group<T, R> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

struct Inner<T, R> {
    queued: Mutex<Vec<Queued<T, R>>>,
    turns: Arc<Semaphore>,
    /// The most weight one turn takes (it takes its first item whatever its weight).
    max_weight: usize,
    write: Write<T, R>,
}

struct Queued<T, R> {
    item: T,
    keys: Vec<Uuid>,
    weight: usize,
    answer: oneshot::Sender<R>,
}

/// Why a call got no answer: the write of its turn panicked.
#[derive(Debug)]
pub struct Lost;

impl<T: Send + 'static, R: Send + 'static> Group<T, R> {
    /// A group whose turns, at most `writers` at once, each take items up to
    /// `max_weight` together and hand them to `write`.
    pub fn new(writers: usize, max_weight: usize, write: Write<T, R>) -> Self {
        let inner = Inner {
            queued: Mutex::new(Vec::new()),
            turns: Arc::new(Semaphore::new(writers.max(1))),
            max_weight: max_weight.max(1),
            write,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Writes `item` with whatever else is queued and returns its answer.
    /// Items naming a common key (a job) are never in one turn, so each
    /// write sees every key once; `weight` counts toward the turn's limit.
    pub async fn write(&self, item: T, keys: Vec<Uuid>, weight: usize) -> Result<R, Lost> {
        let (answer, mut answered) = oneshot::channel();
        self.inner.queued.lock().unwrap().push(Queued { item, keys, weight, answer });
        loop {
            tokio::select! {
                biased;
                answer = &mut answered => return answer.map_err(|_| Lost),
                turn = self.inner.turns.clone().acquire_owned() => {
                    let turn = turn.expect("the group's semaphore is never closed");
                    let taken = self.take();
                    if taken.is_empty() {
                        // Another turn took this call's item.
                        drop(turn);
                        return answered.await.map_err(|_| Lost);
                    }
                    let write = self.inner.write.clone();
                    tokio::spawn(async move {
                        let (items, answers): (Vec<T>, Vec<_>) = taken.into_iter().map(|q| (q.item, q.answer)).unzip();
                        let results = write(items).await;
                        debug_assert_eq!(results.len(), answers.len(), "a write answers each item");
                        for (answer, result) in answers.into_iter().zip(results) {
                            let _ = answer.send(result);
                        }
                        drop(turn);
                    });
                }
            }
        }
    }

    /// The items of one turn, out of the queue.
    fn take(&self) -> Vec<Queued<T, R>> {
        let mut queued = self.inner.queued.lock().unwrap();
        let mut keys = HashSet::new();
        let mut weight = 0;
        let mut taken = Vec::new();
        let mut left = Vec::new();
        for q in queued.drain(..) {
            let fits = taken.is_empty() || weight + q.weight <= self.inner.max_weight;
            if fits && q.keys.iter().all(|k| !keys.contains(k)) {
                keys.extend(q.keys.iter().copied());
                weight += q.weight;
                taken.push(q);
            } else {
                left.push(q);
            }
        }
        *queued = left;
        taken
    }
}

/// Writes `items` together; when that fails and there were several,
/// writes each alone, so that one bad item fails only its own call. `write`
/// answers each item it is given, in order.
pub async fn together_or_alone<'a, T, A, E, F, Fut>(items: &'a [T], write: F) -> Vec<Result<A, E>>
where
    F: Fn(&'a [T]) -> Fut,
    Fut: Future<Output = Result<Vec<A>, E>> + 'a,
{
    if items.len() > 1 {
        if let Ok(answers) = write(items).await {
            return answers.into_iter().map(Ok).collect();
        }
    }
    let alone = items.chunks(1).map(|one| {
        let written = write(one);
        async move { written.await.map(|mut answers| answers.swap_remove(0)) }
    });
    futures::future::join_all(alone).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A group whose write sleeps a little, records each turn's items and
    /// answers each item with itself doubled.
    fn doubling(writers: usize, max_weight: usize, turns: Arc<Mutex<Vec<Vec<u32>>>>) -> Group<u32, u32> {
        Group::new(
            writers,
            max_weight,
            Arc::new(move |items: Vec<u32>| {
                let turns = turns.clone();
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    turns.lock().unwrap().push(items.clone());
                    items.into_iter().map(|i| i * 2).collect()
                })
            }),
        )
    }

    #[tokio::test]
    async fn calls_queued_behind_a_turn_are_written_together_and_each_gets_its_own_answer() {
        let turns = Arc::default();
        let group = doubling(1, 100, Arc::clone(&turns));
        let calls: Vec<_> = (0..20u32)
            .map(|i| {
                let group = group.clone();
                tokio::spawn(async move { group.write(i, vec![Uuid::from_u128(i as u128)], 1).await.unwrap() })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), 2 * i as u32);
        }
        let turns = turns.lock().unwrap();
        assert_eq!(turns.iter().map(Vec::len).sum::<usize>(), 20, "every item written once: {turns:?}");
        assert!(turns.len() < 20, "calls queued behind the first turn went together: {turns:?}");
    }

    #[tokio::test]
    async fn a_turn_never_holds_one_key_twice_nor_more_than_its_weight() {
        let turns = Arc::default();
        let group = doubling(1, 3, Arc::clone(&turns));
        let same = Uuid::from_u128(7);
        let calls: Vec<_> = (0..12u32)
            .map(|i| {
                let group = group.clone();
                let key = if i % 2 == 0 { same } else { Uuid::from_u128(100 + i as u128) };
                tokio::spawn(async move { group.write(i, vec![key], 1).await.unwrap() })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        for turn in turns.lock().unwrap().iter() {
            assert!(turn.len() <= 3, "at most the weight limit per turn: {turn:?}");
            assert!(turn.iter().filter(|i| *i % 2 == 0).count() <= 1, "one item per key per turn: {turn:?}");
        }
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_cut_short_the_others_write() {
        let written = Arc::new(AtomicUsize::new(0));
        let counted = written.clone();
        let group: Group<u32, u32> = Group::new(
            1,
            100,
            Arc::new(move |items: Vec<u32>| {
                let counted = counted.clone();
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    counted.fetch_add(items.len(), Ordering::SeqCst);
                    items
                })
            }),
        );
        // The first call takes a turn, then goes away before it is answered.
        let first = tokio::spawn({
            let group = group.clone();
            async move { group.write(1, vec![Uuid::from_u128(1)], 1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = tokio::spawn({
            let group = group.clone();
            async move { group.write(2, vec![Uuid::from_u128(2)], 1).await }
        });
        first.abort();
        assert_eq!(second.await.unwrap().unwrap(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(written.load(Ordering::SeqCst), 2, "the abandoned call's item was written all the same");
    }

    #[tokio::test]
    async fn a_bad_item_fails_only_its_own_call() {
        let items = [1, 2, 3, 4];
        let calls = AtomicUsize::new(0);
        let answers = together_or_alone(&items, |some: &[i32]| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if some.contains(&3) {
                    Err(format!("refused {some:?}"))
                } else {
                    Ok(some.iter().map(|i| i * 10).collect::<Vec<_>>())
                }
            }
        })
        .await;
        assert_eq!(answers, vec![Ok(10), Ok(20), Err("refused [3]".to_string()), Ok(40)]);
        assert_eq!(calls.load(Ordering::SeqCst), 5, "once together, then once each");
    }
}
