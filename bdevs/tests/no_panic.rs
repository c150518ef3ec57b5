//! Property test: arbitrary requests sent straight to backend channels (skipping the
//! engine's validation) complete with Ok or an errno, never a panic, and the buffer always
//! comes back. Runs off-reactor for the backends that complete at submission (malloc,
//! null, error over malloc, delay with zero latency).

use std::sync::Arc;

use proptest::prelude::*;
use tiercache_bdevs::delay::{DelayBdev, DelayLatencies};
use tiercache_bdevs::error::{ErrorBdev, ErrorKind, ErrorSpec, Trigger};
use tiercache_bdevs::malloc::MallocBdev;
use tiercache_bdevs::null::NullBdev;
use tiercache_engine::bdev::{Bdev, BdevDesc, IoRequest, IoType};
use tiercache_engine::IoBuf;

fn backends() -> Vec<Arc<dyn Bdev>> {
    let m = MallocBdev::create("pm", 2048 + 7, 512).unwrap();
    let e = ErrorBdev::create(BdevDesc::new(MallocBdev::create("pe_base", 300, 4096).unwrap()), None).unwrap();
    e.inject(ErrorSpec::new(None, ErrorKind::CorruptData, Trigger::EveryNth(3))).unwrap();
    let d = DelayBdev::create(
        BdevDesc::new(MallocBdev::create("pd_base", 64, 4096).unwrap()),
        "pd",
        DelayLatencies::default(),
        1,
    )
    .unwrap();
    vec![m, NullBdev::create("pn", 100, 4096).unwrap(), e, d]
}

fn io_type() -> impl Strategy<Value = IoType> {
    prop::sample::select(IoType::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn raw_channels_never_panic(
        t in io_type(),
        offset in prop_oneof![0u64..(2 << 20), Just(u64::MAX), (0u64..64).prop_map(|b| u64::MAX - b * 512)],
        len in prop_oneof![0u64..(2 << 20), Just(u64::MAX), Just(0)],
        buf_len in prop::option::of(0usize..(1 << 20)),
        fua in any::<bool>(),
    ) {
        for b in backends() {
            let ch = b.create_channel().unwrap();
            let req = IoRequest { io_type: t, offset, len, buf: buf_len.map(IoBuf::new), fua };
            let c = futures::executor::block_on(ch.submit(req));
            prop_assert_eq!(c.buf.map(|b| b.len()), buf_len);
            if let Err(e) = c.status {
                prop_assert!(e.0 == libc::EINVAL || e.0 == libc::EOPNOTSUPP, "{:?}", e);
            }
        }
    }
}
