//! Dropout streams draw the same masks whatever other streams draw in
//! between. libtorch's generator is process-wide, so this test has a test
//! binary (a process) of its own: no other test can draw between a reseed
//! and its draw.

use ptune_worker::engine::rng::{before_draw, with_stream, DropoutStream};
use tch::{Kind, Tensor};

fn draw() -> Vec<f32> {
    before_draw();
    Vec::<f32>::try_from(Tensor::rand([4], (Kind::Float, tch::Device::Cpu))).unwrap()
}

#[test]
fn a_stream_draws_the_same_whatever_runs_in_between() {
    let alone = DropoutStream::new(7);
    let expected = [with_stream(Some(&alone), draw), with_stream(Some(&alone), draw)];
    let (a, b) = (DropoutStream::new(7), DropoutStream::new(8));
    let first = with_stream(Some(&a), draw);
    let other = with_stream(Some(&b), draw);
    let second = with_stream(Some(&a), draw);
    assert_eq!([first, second], expected);
    assert_ne!(other, expected[0]);
}
