//! The admission queue on its own: ordering, the queue cap, and that no
//! slot leaks however a request goes away.

use std::time::Duration;

use futures::FutureExt;

use super::*;

fn admission(max_inflight_per_worker: usize, max_queued: usize, workers: usize) -> Admission {
    Admission::new(AdmissionConfig { max_inflight_per_worker, max_queued }, workers)
}

/// Lets spawned waiters run until they are queued or granted.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn free_slots_are_granted_at_once_on_the_least_busy_worker() {
    let q = admission(2, 0, 2);
    let a = q.admit(0).now_or_never().unwrap().unwrap();
    let b = q.admit(0).now_or_never().unwrap().unwrap();
    assert_ne!(a.worker(), b.worker());
    let _c = q.admit(0).now_or_never().unwrap().unwrap();
    let _d = q.admit(0).now_or_never().unwrap().unwrap();
    assert_eq!(q.stats(), AdmissionStats { queued: 0, in_flight: vec![2, 2], active: vec![true; 2] });
}

#[tokio::test]
async fn waiters_are_served_by_priority_then_arrival() {
    let q = admission(1, 100, 1);
    let running = q.admit(0).await.unwrap();
    let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (name, priority) in [("a10", 10), ("b10", 10), ("c0", 0), ("d-10", -10), ("e0", 0)] {
        let (q, order_tx) = (q.clone(), order_tx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = q.admit(priority).await.unwrap();
            order_tx.send(name).unwrap();
            drop(permit);
        }));
        settle().await;
    }
    assert_eq!(q.stats().queued, 5);
    drop(running);
    for task in tasks {
        task.await.unwrap();
    }
    let mut got = Vec::new();
    while let Ok(name) = order.try_recv() {
        got.push(name);
    }
    assert_eq!(got, ["d-10", "c0", "e0", "a10", "b10"]);
    assert_eq!(q.stats(), AdmissionStats { queued: 0, in_flight: vec![0], active: vec![true; 1] });
}

#[tokio::test]
async fn a_full_queue_refuses_with_retry_after() {
    let q = admission(1, 2, 1);
    let _running = q.admit(0).await.unwrap();
    let _w1 = q.enqueue(0, None).unwrap();
    let _w2 = q.enqueue(0, None).unwrap();
    let err = q.admit(-100).now_or_never().unwrap().unwrap_err();
    assert_eq!(err, AdmissionError::QueueFull { queued: 2, retry_after: RETRY_AFTER });
    assert_eq!(q.stats().queued, 2);
}

#[tokio::test]
async fn waiters_that_left_free_their_place_in_the_queue() {
    let q = admission(1, 1, 1);
    let _running = q.admit(0).await.unwrap();
    drop(q.enqueue(0, None).unwrap());
    assert_eq!(q.stats().queued, 0);
    // The dead waiter does not count against the cap.
    let _w = q.enqueue(0, None).unwrap();
    assert!(q.enqueue(0, None).is_err());
}

#[tokio::test]
async fn a_dropped_waiter_is_skipped_and_takes_no_slot() {
    let q = admission(1, 10, 1);
    let running = q.admit(0).await.unwrap();
    // The better waiter's client leaves while it waits.
    let gone = tokio::spawn({
        let q = q.clone();
        async move { q.admit(-5).await.map(|_| ()) }
    });
    settle().await;
    let stays = tokio::spawn({
        let q = q.clone();
        async move { q.admit(5).await.unwrap() }
    });
    settle().await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    drop(running);
    let permit = tokio::time::timeout(Duration::from_secs(5), stays).await.unwrap().unwrap();
    assert_eq!(q.stats(), AdmissionStats { queued: 0, in_flight: vec![1], active: vec![true; 1] });
    drop(permit);
    assert_eq!(q.stats(), AdmissionStats { queued: 0, in_flight: vec![0], active: vec![true; 1] });
}

#[tokio::test]
async fn a_grant_whose_waiter_left_before_receiving_is_returned() {
    let q = admission(1, 10, 1);
    let running = q.admit(0).await.unwrap();
    let ticket = q.enqueue(0, None).unwrap();
    drop(running);
    // Granted, then the receiver drops with the permit still inside.
    drop(ticket);
    assert_eq!(q.stats(), AdmissionStats { queued: 0, in_flight: vec![0], active: vec![true; 1] });
}

#[tokio::test]
async fn the_slot_is_released_when_the_held_stream_ends_or_drops() {
    let q = admission(1, 10, 1);
    let items = hold(stream::iter([1, 2]).boxed(), q.admit(0).await.unwrap());
    assert_eq!(q.stats().in_flight, [1]);
    assert_eq!(items.collect::<Vec<_>>().await, [1, 2]);
    assert_eq!(q.stats().in_flight, [0]);

    let mut items = hold(stream::iter([1, 2]).boxed(), q.admit(0).await.unwrap());
    assert_eq!(items.next().await, Some(1));
    assert_eq!(q.stats().in_flight, [1]);
    drop(items);
    assert_eq!(q.stats().in_flight, [0]);
}

#[tokio::test]
async fn a_chooser_picks_among_free_workers_and_a_full_choice_falls_back() {
    let q = admission(1, 10, 3);
    let to = |w: usize| -> Option<Chooser> { Some(Box::new(move |_: &[usize], _: usize| w)) };
    let on_2 = q.admit_with(0, to(2)).await.unwrap();
    assert_eq!(on_2.worker(), 2);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let chooser: Chooser = Box::new(move |in_flight: &[usize], cap: usize| {
        record.lock().unwrap().push((in_flight.to_vec(), cap));
        2 // full: admission must not overfill it
    });
    let fallback = q.admit_with(0, Some(chooser)).await.unwrap();
    assert_eq!(seen.lock().unwrap().as_slice(), [(vec![0, 0, 1], 1)]);
    assert_eq!(fallback.worker(), 0, "the least busy free worker instead");
    drop((on_2, fallback));
    assert_eq!(q.stats().in_flight, [0, 0, 0]);
}

#[tokio::test]
async fn only_workers_in_the_pool_get_slots_and_waiters_are_refused_when_the_last_one_leaves() {
    let q = Admission::empty(AdmissionConfig { max_inflight_per_worker: 1, max_queued: 8 }, 2);
    assert_eq!(q.admit(0).now_or_never().unwrap().unwrap_err(), AdmissionError::NoWorker);

    q.set_active(1, true);
    let first = q.admit(0).now_or_never().unwrap().unwrap();
    assert_eq!(first.worker(), 1, "slot 0 is empty");
    let waiter = tokio::spawn({
        let q = q.clone();
        async move { q.admit(0).await }
    });
    settle().await;
    assert_eq!(q.stats().queued, 1);
    // A worker joining takes the waiter at once.
    q.set_active(0, true);
    let second = waiter.await.unwrap().unwrap();
    assert_eq!(second.worker(), 0);

    // Both leave while a request waits: it is refused, never left hanging.
    let waiter = tokio::spawn({
        let q = q.clone();
        async move { q.admit(0).await.map(|p| p.worker()) }
    });
    settle().await;
    q.set_active(0, false);
    settle().await;
    assert!(!waiter.is_finished(), "worker 1 is still in the pool");
    q.set_active(1, false);
    assert_eq!(waiter.await.unwrap(), Err(AdmissionError::NoWorker));
    // Running requests keep their permits; dropping them frees the counts.
    drop((first, second));
    assert_eq!(q.stats(), AdmissionStats { queued: 0, in_flight: vec![0, 0], active: vec![false, false] });
}
