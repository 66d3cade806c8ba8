use ring::aead::{self, quic, Aad, LessSafeKey, Nonce, UnboundKey};
use std::hint::black_box;
use std::time::Instant;
fn main() {
    let key = [7u8; 16];
    let hp = [9u8; 16];
    let mut buf = vec![0u8; 120];
    let n = 2_000_000u64;
    for alg in [&aead::AES_128_GCM, &aead::CHACHA20_POLY1305] {
        let klen = alg.key_len();
        let key = &[7u8; 32][..klen];
        let pre = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
        let t = Instant::now();
        for i in 0..n {
            let mut nb = [0u8; 12]; nb[4..].copy_from_slice(&i.to_be_bytes());
            let tag = pre.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nb), Aad::from(&[1u8; 20]), &mut buf).unwrap();
            black_box(tag);
        }
        let a = t.elapsed().as_nanos() as f64 / n as f64;
        let t = Instant::now();
        for i in 0..n {
            let k = LessSafeKey::new(UnboundKey::new(alg, black_box(key)).unwrap());
            let mut nb = [0u8; 12]; nb[4..].copy_from_slice(&i.to_be_bytes());
            let tag = k.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nb), Aad::from(&[1u8; 20]), &mut buf).unwrap();
            black_box(tag);
        }
        let b = t.elapsed().as_nanos() as f64 / n as f64;
        println!("{:?} seal 120B prebuilt {:.0} ns, built per use {:.0} ns; size {}", alg, a, b, std::mem::size_of::<LessSafeKey>());
    }
    for alg in [&quic::AES_128, &quic::CHACHA20] {
        let hpk = &[9u8; 32][..alg.key_len()];
        let pre = quic::HeaderProtectionKey::new(alg, hpk).unwrap();
        let t = Instant::now();
        for _ in 0..n { black_box(pre.new_mask(black_box(&[3u8; 16])).unwrap()); }
        let a = t.elapsed().as_nanos() as f64 / n as f64;
        let t = Instant::now();
        for _ in 0..n { let k = quic::HeaderProtectionKey::new(alg, black_box(hpk)).unwrap(); black_box(k.new_mask(black_box(&[3u8; 16])).unwrap()); }
        let b = t.elapsed().as_nanos() as f64 / n as f64;
        println!("hp {:?}: prebuilt {:.0} ns, per use {:.0} ns; size {}", alg, a, b, std::mem::size_of::<quic::HeaderProtectionKey>());
    }
    let _ = (key, hp);
}
