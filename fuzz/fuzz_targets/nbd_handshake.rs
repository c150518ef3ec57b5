//! Fuzz the NBD handshake: arbitrary client bytes, split at a fuzzer-chosen
//! point, must never panic; a negotiated session's leftover bytes go to the
//! request decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiercache_nbd::*;

fn catalog() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "disk0".into(),
            description: "fuzz".into(),
            size: 1 << 30,
            flags: TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA
                | TransmissionFlags::SEND_DF
                | TransmissionFlags::SEND_WRITE_ZEROES,
            block_sizes: BlockSizes::DEFAULT,
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: 1 << 20,
            flags: TransmissionFlags::READ_ONLY,
            block_sizes: BlockSizes::new(512, 4096, 1 << 16).unwrap_or_default(),
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let config = HandshakeConfig {
        require_fixed_newstyle: ctl & 0x80 == 0,
        max_option_data: 512,
        max_option_skip: 4096,
        max_options: 64,
    };
    let mut hs = Handshake::with_config(catalog(), config);
    if ctl & 0x40 != 0 {
        hs.begin_shutdown();
    }
    let cut = usize::from(ctl & 0x3f).min(input.len());
    let (a, b) = input.split_at(cut);
    let mut used = hs.feed(a);
    if used == a.len() {
        used += hs.feed(b);
    }
    assert!(used <= input.len());
    assert!(hs.input_buffer_capacity() <= 512);
    let out = hs.output().len();
    hs.consume_output(out);
    if let HandshakeState::Negotiated(n) = hs.state() {
        let mut dec = RequestDecoder::new(n.export_config());
        let mut rest = &input[used..];
        while let Ok(d) = dec.decode(rest) {
            rest = &rest[d.consumed..];
            if d.event.is_none() {
                break;
            }
        }
    }
});
