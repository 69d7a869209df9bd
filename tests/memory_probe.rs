//! The CPU memory probe sees an allocation. The probe reads process-wide figures (VmHWM and
//! VmRSS), so this test is alone in its binary: tests running beside it in one process would
//! allocate and free under it.

use sdpipe::memory::MemoryProbe;

#[test]
fn the_probe_sees_a_large_allocation() {
    let probe = MemoryProbe::start("cpu");
    let v = vec![1u8; 64 << 20];
    std::hint::black_box(&v);
    drop(v);
    let peak = probe.peak().unwrap();
    assert!(peak.bytes >= 60 << 20, "{peak:?}");
}
