//! Shared drivers and input generators for the integration tests.
#![allow(dead_code)]

use rand::Rng;
use tiercache_nbd::*;

pub fn catalog() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "disk0".into(),
            description: "cached volume".into(),
            size: 1 << 30,
            flags: TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_DF
                | TransmissionFlags::SEND_CACHE,
            block_sizes: BlockSizes::DEFAULT,
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: 1 << 20,
            flags: TransmissionFlags::READ_ONLY,
            block_sizes: BlockSizes::new(512, 4096, 1 << 16).expect("valid"),
        },
    ]
}

/// Largest reply burst one option can produce with [`catalog`].
pub const MAX_OUTPUT_PER_OPTION: usize = 200;

#[derive(Debug, PartialEq, Eq)]
pub struct HandshakeRun {
    pub consumed: usize,
    pub output: Vec<u8>,
    pub state: HandshakeState,
}

/// Feed `input` cut at `cuts` (sorted or not, any values), draining the
/// output in pieces of `drain` bytes; checks the memory bounds as it goes.
pub fn drive_handshake(input: &[u8], cuts: &[usize], drain: usize) -> HandshakeRun {
    drive_handshake_with(HandshakeConfig::default(), input, cuts, drain)
}

/// Tight limits, so random inputs hit every limit path.
pub fn small_config() -> HandshakeConfig {
    HandshakeConfig { require_fixed_newstyle: false, max_option_data: 64, max_option_skip: 256, max_options: 8 }
}

pub fn drive_handshake_with(cfg: HandshakeConfig, input: &[u8], cuts: &[usize], drain: usize) -> HandshakeRun {
    let mut hs = Handshake::with_config(catalog(), cfg);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let (mut start, mut consumed, mut output) = (0, 0, Vec::new());
    for end in points {
        let chunk = &input[start..end];
        start = end;
        let used = hs.feed(chunk);
        assert!(used <= chunk.len());
        consumed += used;
        assert!(hs.input_buffer_capacity() <= cfg.max_option_data as usize);
        assert!(hs.output().len() <= 18 + MAX_OUTPUT_PER_OPTION * (consumed / 16 + 1));
        while !hs.output().is_empty() {
            let n = drain.max(1).min(hs.output().len());
            output.extend_from_slice(&hs.output()[..n]);
            hs.consume_output(n);
        }
        if used < chunk.len() {
            assert!(hs.is_finished(), "stopped early without finishing");
            break;
        }
    }
    assert!(output.len() <= 18 + MAX_OUTPUT_PER_OPTION * (consumed / 16 + 1));
    HandshakeRun { consumed, output, state: hs.state().clone() }
}

/// Owned form of the decoder's events, with write data coalesced.
#[derive(Debug, PartialEq, Eq)]
pub enum Ev {
    Request(Request),
    Data(Vec<u8>),
    Rejected(Rejection),
    Disconnect,
    Violation(ProtocolViolation),
}

pub fn export_config(structured: bool) -> ExportConfig {
    let flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_DF;
    let bs = BlockSizes::new(512, 4096, 1 << 16).expect("valid");
    ExportConfig::new(1 << 24, flags, bs, structured).with_discard_limit(1 << 17)
}

pub fn drive_decoder(cfg: ExportConfig, input: &[u8], cuts: &[usize]) -> Vec<Ev> {
    let mut dec = RequestDecoder::new(cfg);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let mut evs = Vec::new();
    let mut start = 0;
    for end in points {
        let chunk = &input[start..end];
        start = end;
        let mut pos = 0;
        loop {
            match dec.decode(&chunk[pos..]) {
                Err(v) => {
                    evs.push(Ev::Violation(v));
                    return evs;
                }
                Ok(d) => {
                    assert!(d.consumed <= chunk.len() - pos);
                    pos += d.consumed;
                    match d.event {
                        None => {
                            assert_eq!(pos, chunk.len(), "None means all input used");
                            break;
                        }
                        Some(Event::WriteData { data, remaining }) => {
                            assert!(!data.is_empty());
                            assert_eq!(remaining, dec.payload_remaining());
                            match evs.last_mut() {
                                Some(Ev::Data(v)) => v.extend_from_slice(data),
                                _ => evs.push(Ev::Data(data.to_vec())),
                            }
                        }
                        Some(Event::Request(r)) => evs.push(Ev::Request(r)),
                        Some(Event::Rejected(r)) => evs.push(Ev::Rejected(r)),
                        Some(Event::Disconnect) => evs.push(Ev::Disconnect),
                    }
                }
            }
        }
    }
    evs
}

pub fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// A plausible client handshake: flags, a few options, usually a final
/// GO / EXPORT_NAME / ABORT, then some transmission bytes.
pub fn valid_handshake<R: Rng>(rng: &mut R) -> Vec<u8> {
    let names = ["disk0", "ro", "", "nope"];
    let mut v = vec![0, 0, 0, if rng.gen_bool(0.5) { 1 } else { 3 }];
    for _ in 0..rng.gen_range(0..6) {
        let name = names[rng.gen_range(0..names.len())];
        let infos: Vec<u16> = (0..rng.gen_range(0..4)).map(|_| rng.gen_range(0..5)).collect();
        let opt = match rng.gen_range(0..7) {
            0 => option(3, b""),
            1 => option(6, &info_data(name, &infos)),
            2 => option(8, b""),
            3 => option(5, b""),
            4 => option(rng.gen_range(9..40), &[0xaa; 7]),
            5 => option(10, &info_data(name, &[])),
            _ => option(8, b"x"),
        };
        v.extend(opt);
    }
    let name = names[rng.gen_range(0..names.len())];
    match rng.gen_range(0..4) {
        0 => v.extend(option(1, name.as_bytes())),
        1 => v.extend(option(2, b"")),
        _ => v.extend(option(7, &info_data(name, &[3]))),
    }
    v.extend(request_header(0, 0, 1, 0, 512));
    v
}

pub fn request_header(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = vec![0x25, 0x60, 0x95, 0x13];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// A stream of mostly-valid requests (writes carry their payload).
pub fn valid_requests<R: Rng>(rng: &mut R) -> Vec<u8> {
    let mut v = Vec::new();
    for cookie in 0..rng.gen_range(1..12u64) {
        let cmd = *[0u16, 0, 1, 1, 1, 3, 4, 5, 6, 7, 42].get(rng.gen_range(0..11)).unwrap_or(&0);
        let flags = [0u16, 0, 0, 1, 2, 4, 16, 0x100][rng.gen_range(0..8)];
        let len: u32 = match rng.gen_range(0..5) {
            0 => 0,
            1 => rng.gen_range(1..3000),
            2 => 512 * rng.gen_range(1..9),
            3 => (1 << 16) + 512,
            _ => 4096,
        };
        let offset = match rng.gen_range(0..4) {
            0 => 0,
            1 => 512 * rng.gen_range(0..40_000u64),
            2 => rng.gen(),
            _ => (1 << 24) - 512,
        };
        let cmd = if cmd == 3 && rng.gen_bool(0.7) { 3 } else { cmd };
        let (offset, len) = if cmd == 3 { (0, 0) } else { (offset, len) };
        v.extend(request_header(flags, cmd, cookie, offset, len));
        if cmd == 1 {
            v.resize(v.len() + len as usize, cookie as u8 ^ 0x5a);
        }
    }
    if rng.gen_bool(0.2) {
        v.extend(request_header(0, 2, 99, 0, 0));
    }
    v
}

/// Flip, overwrite, insert, delete or truncate a few bytes.
pub fn mutate<R: Rng>(rng: &mut R, v: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..4) {
        if v.is_empty() {
            v.push(rng.gen());
            continue;
        }
        let at = rng.gen_range(0..v.len());
        match rng.gen_range(0..5) {
            0 => v[at] ^= 1 << rng.gen_range(0..8),
            1 => v[at] = [0, 0xff, 0x7f, 0x80][rng.gen_range(0..4)],
            2 => v.insert(at, rng.gen()),
            3 => {
                v.remove(at);
            }
            _ => v.truncate(at),
        }
    }
}
