//! Arbitrary bytes through `cursor::priority::state::decode` and through
//! `cursor::priority::state_file::decode_file` (the two-slot state file): never panics.
//!
//! A decoded state has `lanes × partitions` queues and re-encodes to a file that decodes to
//! the same state; each input is also tried with its trailing CRC-32 repaired, so mutations
//! of the fields get past the check.
//!
//! `decode_file` gets the input as it is (a version-1 file, or a whole slotted file), and a
//! two-slot file built from it (`rill_fuzz::two_slot_file`: small inputs reach the slot
//! decoder, optionally with both slots' CRCs repaired). A decoded version-1 file is exactly
//! its one state. For a slotted file: each slot on its own (the other zeroed) is what the
//! file yields when it is the valid one with the larger sequence (the first on a tie), and
//! the winning slot rewritten with `state::encode` of the decoded state under the same
//! sequence decodes to the same sequence and state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_engine::cursor::priority::state::{decode, encode, CursorState, STATE_MAGIC};
use rill_engine::cursor::priority::state_file::{decode_file, SLOT_HEADER_SIZE};
use rill_fuzz::{two_slot_file, with_fixed_crc, write_state_slot};

fn check_shape(state: &CursorState) {
    assert_eq!(state.queues.len(), usize::from(state.lanes) * state.partitions as usize);
}

fn check(data: &[u8]) {
    if let Ok(state) = decode(data) {
        check_shape(&state);
        let again = decode(&encode(&state)).expect("re-encoded cursor state decodes");
        assert_eq!(again, state, "cursor state does not round-trip");
    }
}

fn check_file(bytes: &[u8]) {
    let Ok((sequence, state)) = decode_file(bytes) else { return };
    check_shape(&state);
    let Some(sequence) = sequence else {
        assert!(bytes.starts_with(&STATE_MAGIC), "only a version-1 file decodes without a sequence");
        assert_eq!(decode(bytes).expect("a version-1 file is one state"), state);
        return;
    };
    let slot_size = bytes.len() / 2;
    let alone = |keep: usize| {
        let mut file = vec![0u8; bytes.len()];
        let range = keep * slot_size..(keep + 1) * slot_size;
        file[range.clone()].copy_from_slice(&bytes[range]);
        decode_file(&file).ok()
    };
    let (winner, want) = match (alone(0), alone(1)) {
        (Some(a), Some(b)) if a.0 >= b.0 => (0, a),
        (Some(_), Some(b)) => (1, b),
        (Some(a), None) => (0, a),
        (None, Some(b)) => (1, b),
        (None, None) => panic!("a state file decoded although neither slot is valid on its own"),
    };
    assert_eq!(want, (Some(sequence), state.clone()), "the valid slot with the larger sequence wins");
    let encoded = encode(&state);
    if SLOT_HEADER_SIZE + encoded.len() <= slot_size {
        let mut again = bytes.to_vec();
        write_state_slot(&mut again[winner * slot_size..(winner + 1) * slot_size], sequence, &encoded);
        let decoded = decode_file(&again).expect("a re-encoded winning slot decodes");
        assert_eq!(decoded, (Some(sequence), state), "the winning slot re-encodes to the same state");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check_file(data);
    if let Some(fixed) = with_fixed_crc(data) {
        check(&fixed);
        check_file(&fixed);
    }
    check_file(&two_slot_file(data));
});
