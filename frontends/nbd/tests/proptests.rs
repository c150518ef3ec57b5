//! Property tests: arbitrary input never panics and stays within memory
//! bounds, and the result never depends on how the input was split.

mod common;

use common::*;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tiercache_nbd::*;

fn splits() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<usize>(), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn handshake_random_bytes(input in prop::collection::vec(any::<u8>(), 0..600),
                              cuts in splits(), drain in 1usize..64, small in any::<bool>()) {
        let cfg = if small { small_config() } else { HandshakeConfig::default() };
        let whole = drive_handshake_with(cfg, &input, &[], usize::MAX);
        let split = drive_handshake_with(cfg, &input, &cuts, drain);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn handshake_valid_scripts_split_anywhere(seed in any::<u64>(), cuts in splits(),
                                              drain in 1usize..64, mutate_it in any::<bool>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut input = valid_handshake(&mut rng);
        if mutate_it {
            mutate(&mut rng, &mut input);
        }
        let whole = drive_handshake(&input, &[], usize::MAX);
        prop_assert!(whole.consumed <= input.len());
        if !mutate_it {
            // A well-formed script ends exactly before the trailing request,
            // unless its final GO named an unknown export (then the request
            // bytes are read as an option with a bad magic).
            match &whole.state {
                HandshakeState::Negotiated(_) | HandshakeState::Aborted => {
                    prop_assert_eq!(whole.consumed, input.len() - 28);
                }
                HandshakeState::Failed(HandshakeError::UnknownExport(_)) => {
                    prop_assert_eq!(whole.consumed, input.len() - 28);
                }
                state => prop_assert!(
                    matches!(state, HandshakeState::Failed(HandshakeError::BadOptionMagic(_))),
                    "unexpected {:?}", state
                ),
            }
        }
        prop_assert_eq!(whole, drive_handshake(&input, &cuts, drain));
    }

    #[test]
    fn decoder_random_bytes(input in prop::collection::vec(any::<u8>(), 0..400),
                            structured in any::<bool>(), cuts in splits()) {
        let cfg = export_config(structured);
        prop_assert_eq!(drive_decoder(cfg, &input, &[]), drive_decoder(cfg, &input, &cuts));
    }

    #[test]
    fn decoder_request_streams_split_anywhere(seed in any::<u64>(), structured in any::<bool>(),
                                              cuts in splits(), mutate_it in any::<bool>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut input = valid_requests(&mut rng);
        if mutate_it {
            mutate(&mut rng, &mut input);
        }
        let cfg = export_config(structured);
        let whole = drive_decoder(cfg, &input, &[]);
        if !mutate_it {
            // Every header gets exactly one event and payloads stay in sync.
            prop_assert!(!whole.iter().any(|e| matches!(e, Ev::Violation(ProtocolViolation::BadMagic(_)))));
        }
        for ev in &whole {
            if let Ev::Request(r) = ev {
                prop_assert!(r.offset.checked_add(u64::from(r.length)).is_some_and(|e| e <= cfg.size()));
            }
        }
        prop_assert_eq!(whole, drive_decoder(cfg, &input, &cuts));
    }

    #[test]
    fn validate_accepts_only_in_range_aligned_requests(
        flags in any::<u16>(), cmd in 0u16..10, offset in any::<u64>(), length in any::<u32>(),
        structured in any::<bool>(),
    ) {
        let cfg = export_config(structured);
        let raw = RawRequest { flags: CommandFlags(flags), command: cmd, cookie: Cookie(1), offset, length };
        match validate(&raw, &cfg) {
            Ok(r) if r.command == Command::Disc || r.command == Command::Flush => {
                prop_assert!(r.command == Command::Disc || (offset == 0 && length == 0));
            }
            Ok(r) => {
                prop_assert!(length > 0 && offset % 512 == 0 && length % 512 == 0);
                prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= cfg.size()));
                prop_assert_eq!(r.flags.unknown_bits(), 0);
            }
            Err(rej) => {
                prop_assert_eq!(rej.skipped_payload, if cmd == 1 { length } else { 0 });
                prop_assert_ne!(rej.error, NbdError::Io);
            }
        }
    }

    #[test]
    fn offset_data_header_length_matches(offset in any::<u64>(), len in 1u32..=u32::MAX - 8,
                                         cookie in any::<u64>(), done in any::<bool>()) {
        let h = offset_data_header(Cookie(cookie), offset, len, done).expect("in range");
        prop_assert_eq!(u32::from_be_bytes([h[16], h[17], h[18], h[19]]), len + 8);
        prop_assert_eq!(&h[8..16], &cookie.to_be_bytes()[..]);
        prop_assert_eq!(&h[20..], &offset.to_be_bytes()[..]);
        prop_assert_eq!(h[5] & 1 == 1, done);
    }
}
