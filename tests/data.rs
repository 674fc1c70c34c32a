//! Tests of the data pipeline: datasets, PIL-equivalent ops, transforms, augmentations, loader.
//!
//! Known answers come from Pillow 13 where PIL defines the result (the snippet that made them is
//! next to the constants) and are computed by hand elsewhere. The Imagenette checks run only
//! when ../shared/data/imagenette2-224 exists.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use ghostv3::data::augment::{
    apply_op, AugmentHparams, AugmentOp, OpName, RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS,
};
use ghostv3::data::mixup::{cut_from_flipped, cutmix_bbox_and_lam, mix_with_flipped, mixup_target};
use ghostv3::data::ops::{self, Resample};
use ghostv3::data::transforms::{random_resized_crop_params, to_tensor_normalize};
use ghostv3::data::{
    one_hot_smoothed, AutoAugment, Cifar10, Dataset, EraseMode, ImageFolder, Interpolation, Loader,
    Mixup, RandAugment, RandomErasing, Subset, Synthetic, Transform, TransformConfig,
};
use ghostv3::Tensor;
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// An image whose channel c at (x, y) is f(x, y, c).
fn tiny(w: u32, h: u32, f: impl Fn(u32, u32, u32) -> u32) -> RgbImage {
    RgbImage::from_fn(
        w,
        h,
        |x, y| Rgb([0, 1, 2].map(|c| (f(x, y, c) % 256) as u8)),
    )
}

// The images the Pillow constants were made from (same formulas in the Python snippet).
fn img_a() -> RgbImage {
    tiny(4, 3, |x, y, c| x * 37 + y * 91 + c * 53 + 11)
}
fn img_b() -> RgbImage {
    tiny(4, 3, |x, y, c| 50 + (x * 13 + y * 29 + c * 7) % 120)
}
fn img_c() -> RgbImage {
    tiny(6, 5, |x, y, c| x * 41 + y * 67 + c * 29 + 5)
}
fn img_d() -> RgbImage {
    tiny(7, 5, |x, y, c| x * 29 + y * 53 + c * 71 + x * y * 13)
}

const FILL: [u8; 3] = [124, 116, 104];

// Pillow 13.0.0:
//   import numpy as np; from PIL import Image, ImageOps, ImageEnhance
//   def tiny(w, h, f):
//       a = np.zeros((h, w, 3), np.uint8)
//       for y in range(h):
//           for x in range(w):
//               for c in range(3): a[y, x, c] = f(x, y, c) % 256
//       return Image.fromarray(a)
//   A = tiny(4, 3, lambda x, y, c: x * 37 + y * 91 + c * 53 + 11)
//   B = tiny(4, 3, lambda x, y, c: 50 + (x * 13 + y * 29 + c * 7) % 120)
//   C = tiny(6, 5, lambda x, y, c: x * 41 + y * 67 + c * 29 + 5)
//   D = tiny(7, 5, lambda x, y, c: x * 29 + y * 53 + c * 71 + x * y * 13)
//   fill = (124, 116, 104)
//   AUTOCONTRAST_B = ImageOps.autocontrast(B)
//   SHARPNESS_A_03 = ImageEnhance.Sharpness(A).enhance(0.3)
//   COLOR_A_03 = ImageEnhance.Color(A).enhance(0.3)
//   CONTRAST_A_17 = ImageEnhance.Contrast(A).enhance(1.7)
//   ROTATE_C_27_BILINEAR = C.rotate(27, resample=Image.BILINEAR, fillcolor=fill)
//   ROTATE_C_M13_BICUBIC = C.rotate(-13, resample=Image.BICUBIC, fillcolor=fill)
//   SHEARX_C_027_BICUBIC = C.transform(C.size, Image.AFFINE, (1, 0.27, 0, 0, 1, 0),
//                                      resample=Image.BICUBIC, fillcolor=fill)
//   TRANSLATEY_C_M04_BILINEAR = C.transform(C.size, Image.AFFINE, (1, 0, 0, 0, 1, -0.4 * 5),
//                                           resample=Image.BILINEAR, fillcolor=fill)
//   RESIZE_D_3x4_BILINEAR = D.resize((3, 4), Image.BILINEAR)   # and BICUBIC, (10, 8), (6, 2)
//   each printed as np.asarray(im).ravel().tolist() (the 3x4 and 6x2 resizes: 6 pixels a line)
#[rustfmt::skip]
const AUTOCONTRAST_B: [u8; 36] = [
    0, 0, 0, 34, 34, 34, 68, 68, 68, 102, 102, 102, 76, 76, 76, 110, 110, 110, 144, 144, 144,
    178, 178, 178, 152, 152, 152, 186, 186, 186, 220, 220, 220, 254, 255, 254,
];
#[rustfmt::skip]
const SHARPNESS_A_03: [u8; 36] = [
    11, 64, 117, 48, 101, 154, 85, 138, 191, 122, 175, 228, 102, 155, 208, 125, 164, 189, 148,
    173, 81, 213, 10, 63, 193, 246, 43, 230, 27, 80, 11, 64, 117, 48, 101, 154,
];
#[rustfmt::skip]
const COLOR_A_03: [u8; 36] = [
    41, 57, 72, 78, 94, 109, 115, 131, 146, 152, 168, 183, 132, 148, 163, 169, 185, 200, 185,
    201, 140, 117, 56, 72, 202, 218, 157, 134, 73, 89, 41, 57, 72, 78, 94, 109,
];
#[rustfmt::skip]
const CONTRAST_A_17: [u8; 36] = [
    0, 22, 112, 0, 85, 175, 58, 148, 238, 121, 211, 255, 87, 177, 255, 150, 240, 255, 213, 255,
    0, 255, 0, 21, 242, 255, 0, 255, 0, 49, 0, 22, 112, 0, 85, 175,
];
#[rustfmt::skip]
const ROTATE_C_27_BILINEAR: [u8; 90] = [
    124, 116, 104, 89, 118, 147, 126, 155, 184, 192, 124, 153, 88, 58, 68, 124, 116, 104, 34,
    63, 92, 99, 128, 157, 166, 195, 224, 147, 108, 137, 82, 73, 102, 104, 133, 162, 74, 103,
    132, 141, 170, 185, 197, 226, 68, 29, 58, 76, 85, 114, 143, 152, 181, 185, 122, 151, 180,
    182, 173, 186, 147, 108, 85, 60, 89, 118, 127, 156, 185, 192, 221, 180, 124, 116, 104, 197,
    167, 25, 131, 63, 92, 100, 129, 158, 137, 166, 195, 124, 116, 104,
];
#[rustfmt::skip]
const ROTATE_C_M13_BICUBIC: [u8; 90] = [
    30, 59, 88, 43, 72, 97, 76, 105, 138, 104, 131, 160, 134, 187, 253, 124, 116, 104, 103, 128,
    198, 126, 175, 222, 164, 194, 187, 184, 248, 255, 255, 101, 140, 148, 125, 56, 213, 230, 91,
    225, 149, 174, 202, 231, 10, 24, 53, 79, 106, 30, 58, 25, 42, 104, 130, 107, 29, 154, 0, 66,
    7, 71, 116, 61, 91, 124, 80, 129, 165, 127, 152, 209, 124, 116, 104, 68, 121, 146, 124, 151,
    180, 150, 179, 230, 183, 212, 177, 196, 225, 141,
];
#[rustfmt::skip]
const SHEARX_C_027_BICUBIC: [u8; 90] = [
    9, 38, 67, 55, 84, 113, 96, 125, 154, 137, 166, 199, 178, 207, 202, 214, 243, 0, 84, 113,
    142, 131, 160, 189, 172, 226, 255, 238, 138, 167, 154, 0, 23, 0, 55, 84, 160, 189, 255, 242,
    255, 89, 72, 101, 29, 12, 41, 88, 77, 106, 135, 124, 116, 104, 255, 29, 44, 41, 56, 85, 68,
    97, 126, 109, 138, 167, 152, 181, 210, 124, 116, 104, 70, 99, 128, 111, 140, 169, 152, 181,
    220, 195, 224, 198, 227, 255, 0, 124, 116, 104,
];
#[rustfmt::skip]
const TRANSLATEY_C_M04_BILINEAR: [u8; 90] = [
    124, 116, 104, 124, 116, 104, 124, 116, 104, 124, 116, 104, 124, 116, 104, 124, 116, 104,
    124, 116, 104, 124, 116, 104, 124, 116, 104, 124, 116, 104, 124, 116, 104, 124, 116, 104, 5,
    34, 63, 46, 75, 104, 87, 116, 145, 128, 157, 186, 169, 198, 227, 210, 239, 12, 72, 101, 130,
    113, 142, 171, 154, 183, 212, 195, 224, 253, 236, 9, 38, 21, 50, 79, 139, 168, 197, 180,
    209, 238, 221, 250, 23, 6, 35, 64, 47, 76, 105, 88, 117, 146,
];
#[rustfmt::skip]
const RESIZE_D_3X4_BILINEAR: [u8; 36] = [
    41, 112, 169, 106, 162, 136, 129, 186, 65, 116, 164, 157, 133, 144, 106, 95, 134, 121,
    158, 143, 115, 109, 137, 161, 149, 157, 112, 128, 103, 111, 124, 108, 119, 128, 103, 160,
];
#[rustfmt::skip]
const RESIZE_D_3X4_BICUBIC: [u8; 36] = [
    29, 105, 176, 108, 166, 135, 133, 190, 59, 113, 171, 163, 143, 139, 94, 85, 131, 126,
    165, 142, 111, 102, 134, 170, 156, 165, 107, 129, 97, 108, 119, 113, 113, 129, 93, 168,
];
#[rustfmt::skip]
const RESIZE_D_10X8_BICUBIC: [u8; 240] = [
    0, 65, 136, 10, 81, 151, 31, 102, 177, 51, 122, 211, 71, 140, 252, 89, 167, 164, 110, 199,
    0, 144, 220, 9, 171, 240, 37, 185, 255, 53, 17, 87, 157, 34, 105, 190, 60, 134, 193, 84,
    167, 128, 116, 200, 155, 149, 178, 122, 163, 121, 38, 100, 145, 70, 95, 173, 103, 120, 191,
    120, 53, 124, 196, 77, 149, 230, 111, 180, 191, 141, 202, 26, 163, 249, 38, 200, 181, 82,
    213, 32, 116, 49, 63, 139, 14, 101, 169, 54, 125, 193, 86, 156, 255, 112, 208, 170, 162,
    203, 79, 212, 80, 68, 104, 107, 97, 61, 119, 154, 107, 101, 195, 81, 151, 73, 110, 197, 58,
    153, 223, 98, 119, 204, 200, 160, 201, 111, 195, 150, 55, 175, 40, 131, 66, 72, 181, 32,
    135, 198, 97, 184, 170, 157, 164, 53, 166, 194, 51, 150, 234, 100, 151, 245, 48, 207, 130,
    77, 196, 44, 126, 48, 101, 180, 70, 152, 246, 126, 213, 194, 179, 243, 62, 244, 94, 100,
    160, 83, 159, 45, 138, 200, 199, 112, 62, 154, 84, 119, 100, 90, 145, 77, 161, 78, 144, 106,
    130, 146, 103, 144, 89, 160, 119, 151, 138, 193, 153, 83, 175, 126, 45, 123, 228, 6, 97,
    107, 61, 157, 28, 141, 148, 119, 197, 0, 198, 61, 32, 147, 9, 107, 11, 89, 178, 67, 180,
    255, 147, 101, 170, 202, 0, 51,
];
#[rustfmt::skip]
const RESIZE_D_6X2_BILINEAR: [u8; 36] = [
    61, 130, 180, 104, 149, 147, 118, 156, 122, 133, 145, 117, 108, 138, 84, 113, 182, 113,
    157, 142, 117, 134, 115, 117, 113, 116, 130, 111, 140, 147, 144, 140, 138, 132, 117, 130,
];

// ---------------------------------------------------------------------------------------------
// PIL-equivalent ops

#[test]
fn lut_ops_match_hand_computed_values() {
    let a = img_a();
    let check = |out: &RgbImage, f: &dyn Fn(u8) -> u8, what: &str| {
        for (o, &v) in out.as_raw().iter().zip(a.as_raw()) {
            assert_eq!(*o, f(v), "{what} of {v}");
        }
    };
    check(&ops::invert(&a), &|v| 255 - v, "invert");
    check(
        &ops::solarize(&a, 128),
        &|v| if v < 128 { v } else { 255 - v },
        "solarize 128",
    );
    check(&ops::solarize(&a, 256), &|v| v, "solarize 256");
    check(&ops::posterize(&a, 3), &|v| v & 0b1110_0000, "posterize 3");
    check(&ops::posterize(&a, 0), &|_| 0, "posterize 0");
    check(&ops::posterize(&a, 8), &|v| v, "posterize 8");
    check(
        &ops::solarize_add(&a, 50, 128),
        &|v| {
            if v < 128 {
                (v as u32 + 50).min(255) as u8
            } else {
                v
            }
        },
        "solarize_add 50",
    );
    // Brightness blends with black: trunc(v * f) in f32, clipped.
    check(
        &ops::enhance_brightness(&a, 0.7),
        &|v| (v as f32 * 0.7) as u8,
        "brightness 0.7",
    );
    check(
        &ops::enhance_brightness(&a, 1.5),
        &|v| (v as f32 * 1.5).min(255.0) as u8,
        "brightness 1.5",
    );
}

#[test]
fn auto_contrast_and_equalize_match_pillow() {
    assert_eq!(
        ops::auto_contrast(&img_b()).as_raw(),
        &AUTOCONTRAST_B.to_vec()
    );
    // A flat channel is left alone.
    let flat = RgbImage::from_pixel(3, 2, Rgb([7, 7, 7]));
    assert_eq!(ops::auto_contrast(&flat), flat);
    // Equalize, by hand: three levels of 300 pixels each. Pillow's step is
    // (900 - 300) // 255 = 2; the LUT is n // step with n = step // 2 + pixels below the level,
    // clipped at 255: 10 -> 0, 100 -> 301 // 2 = 150, 200 -> 601 // 2 = 300 -> 255.
    let levels = RgbImage::from_fn(30, 30, |_, y| {
        let v = [10, 100, 200][y as usize / 10];
        Rgb([v, v, v])
    });
    let eq = ops::equalize(&levels);
    for (x, y) in [(0, 0), (5, 15), (29, 29)] {
        let want = [0, 150, 255][y as usize / 10];
        assert_eq!(eq.get_pixel(x, y).0, [want; 3]);
    }
    // Fewer than 256 pixels with distinct values: step is 0, so Pillow returns the image.
    assert_eq!(ops::equalize(&img_a()), img_a());
}

#[test]
fn enhancers_match_pillow() {
    assert_eq!(
        ops::enhance_sharpness(&img_a(), 0.3).as_raw(),
        &SHARPNESS_A_03.to_vec()
    );
    assert_eq!(
        ops::enhance_color(&img_a(), 0.3).as_raw(),
        &COLOR_A_03.to_vec()
    );
    assert_eq!(
        ops::enhance_contrast(&img_a(), 1.7).as_raw(),
        &CONTRAST_A_17.to_vec()
    );
    // Factor 1 is the identity for every enhancer.
    for f in [
        ops::enhance_color,
        ops::enhance_contrast,
        ops::enhance_brightness,
        ops::enhance_sharpness,
    ] {
        assert_eq!(f(&img_c(), 1.0), img_c());
    }
}

#[test]
fn geometric_ops_match_pillow() {
    let c = img_c();
    let cases = [
        (
            ops::rotate(&c, 27.0, Resample::Bilinear, FILL),
            &ROTATE_C_27_BILINEAR[..],
            "rotate 27",
        ),
        (
            ops::rotate(&c, -13.0, Resample::Bicubic, FILL),
            &ROTATE_C_M13_BICUBIC[..],
            "rotate -13",
        ),
        (
            ops::shear_x(&c, 0.27, Resample::Bicubic, FILL),
            &SHEARX_C_027_BICUBIC[..],
            "shear x",
        ),
        (
            ops::translate(&c, 0.0, -0.4 * 5.0, Resample::Bilinear, FILL),
            &TRANSLATEY_C_M04_BILINEAR[..],
            "translate y",
        ),
    ];
    for (got, want, what) in cases {
        assert_eq!(got.as_raw().as_slice(), want, "{what}");
    }
    // Rotating by 0 or 360 is a copy; by 180 reverses rows and columns.
    assert_eq!(ops::rotate(&c, 360.0, Resample::Bicubic, FILL), c);
    let r180 = ops::rotate(&c, 180.0, Resample::Bilinear, FILL);
    assert_eq!(r180.get_pixel(0, 0), c.get_pixel(5, 4));
}

#[test]
fn resize_matches_pillow_bit_for_bit() {
    let d = img_d();
    let cases = [
        (3, 4, Resample::Bilinear, &RESIZE_D_3X4_BILINEAR[..]),
        (3, 4, Resample::Bicubic, &RESIZE_D_3X4_BICUBIC[..]),
        (10, 8, Resample::Bicubic, &RESIZE_D_10X8_BICUBIC[..]),
        // Height shrinks by more than twice the width: Pillow 13 resamples vertically first.
        (6, 2, Resample::Bilinear, &RESIZE_D_6X2_BILINEAR[..]),
    ];
    for (w, h, r, want) in cases {
        let got = ops::resize(&d, w, h, r).unwrap();
        assert_eq!(got.dimensions(), (w as u32, h as u32));
        assert_eq!(got.as_raw().as_slice(), want, "{w}x{h} {r:?}");
    }
    // A constant image stays constant under both filters (weights sum to one).
    let flat = RgbImage::from_pixel(9, 7, Rgb([10, 128, 250]));
    for r in [Resample::Bilinear, Resample::Bicubic] {
        let out = ops::resize(&flat, 4, 11, r).unwrap();
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
    }
    assert!(ops::resize(&d, 0, 3, Resample::Bilinear).is_err());
}

#[test]
fn flips_and_crops_give_known_pixels() {
    // Pixel (x, y) holds (x, y, 0), so every output pixel says where it came from.
    let img = tiny(6, 4, |x, y, c| [x, y, 0][c as usize]);
    let h = ops::hflip(&img);
    let v = ops::vflip(&img);
    for (x, y, p) in img.enumerate_pixels() {
        assert_eq!(h.get_pixel(5 - x, y), p);
        assert_eq!(v.get_pixel(x, 3 - y), p);
    }
    // Centre crop 2x2 of 6x4: offsets (6-2)/2 = 2 and (4-2)/2 = 1.
    let cc = ops::center_crop(&img, 2, 2);
    assert_eq!(cc.get_pixel(0, 0).0, [2, 1, 0]);
    assert_eq!(cc.get_pixel(1, 1).0, [3, 2, 0]);
    // 5 wide: (5-2)/2 = 1.5 rounds half to even (Python's round) -> 2.
    let odd = tiny(5, 4, |x, y, c| [x, y, 0][c as usize]);
    assert_eq!(ops::center_crop(&odd, 2, 2).get_pixel(0, 0).0, [2, 1, 0]);
    // 7 wide: (7-2)/2 = 2.5 -> 2.
    let odd7 = tiny(7, 4, |x, y, c| [x, y, 0][c as usize]);
    assert_eq!(ops::center_crop(&odd7, 2, 2).get_pixel(0, 0).0, [2, 1, 0]);
    // A crop larger than the image pads with zeros like torchvision: 2x2 -> 4x3 puts the image
    // at left (4-2)//2 = 1, top (3-2)//2 = 0.
    let small = RgbImage::from_pixel(2, 2, Rgb([9, 9, 9]));
    let padded = ops::center_crop(&small, 3, 4);
    assert_eq!(padded.dimensions(), (4, 3));
    assert_eq!(padded.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(padded.get_pixel(1, 0).0, [9, 9, 9]);
    assert_eq!(padded.get_pixel(2, 1).0, [9, 9, 9]);
    assert_eq!(padded.get_pixel(3, 2).0, [0, 0, 0]);
    // Shorter side to 8, longer int(8 * 6 / 4) = 12.
    let rs = ops::resize_shorter(&img, 8, Resample::Bilinear).unwrap();
    assert_eq!(rs.dimensions(), (12, 8));
}

// ---------------------------------------------------------------------------------------------
// Transforms

#[test]
fn normalize_of_a_constant_image_is_closed_form() {
    let img = RgbImage::from_pixel(3, 2, Rgb([0, 128, 255]));
    let mean = [0.485, 0.456, 0.406];
    let std = [0.229, 0.224, 0.225];
    let mut out = vec![0.0f32; 18];
    to_tensor_normalize(&img, mean, std, &mut out);
    for c in 0..3 {
        let v = [0.0f32, 128.0, 255.0][c];
        let want = (v / 255.0 - mean[c] as f32) / std[c] as f32;
        // CHW: channel c is one contiguous plane.
        assert!(out[c * 6..(c + 1) * 6].iter().all(|&x| x == want));
    }
}

#[test]
fn random_resized_crop_params_follow_torchvision() {
    let mut r = rng(1);
    for _ in 0..500 {
        let (top, left, h, w) =
            random_resized_crop_params(300, 200, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut r);
        assert!(h > 0 && w > 0 && top + h <= 200 && left + w <= 300);
        let area = (h * w) as f64 / 60000.0;
        // Rounding h and w moves area and ratio a little past the sampled ranges.
        assert!((0.07..=1.01).contains(&area), "area {area}");
        let ratio = w as f64 / h as f64;
        assert!((0.70..=1.40).contains(&ratio), "ratio {ratio}");
    }
    // Same seed, same crops.
    let a: Vec<_> = (0..5)
        .map(|_| random_resized_crop_params(300, 200, (0.08, 1.0), (0.75, 1.33), &mut rng(7)))
        .collect();
    assert!(a.windows(2).all(|p| p[0] == p[1]));
    // No try fits (scale > 1): the fallback is the centre crop clamped to the ratio range.
    // 100x10 is wider than 4/3: h = 10, w = round(10 * 4/3) = 13, left = (100 - 13) // 2 = 43.
    let p = random_resized_crop_params(100, 10, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut rng(0));
    assert_eq!(p, (0, 43, 10, 13));
    // 10x100 is taller than 3/4: w = 10, h = round(10 / 0.75) = 13, top = 43.
    let p = random_resized_crop_params(10, 100, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut rng(0));
    assert_eq!(p, (43, 0, 13, 10));
    // Within the ratio range: the whole image.
    let p = random_resized_crop_params(40, 35, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut rng(0));
    assert_eq!(p, (0, 0, 35, 40));
}

fn photo_like(seed: u64) -> RgbImage {
    Synthetic::new(10, 96, seed).draw(3)
}

#[test]
fn train_transform_shapes_ranges_and_determinism() {
    let cfg = TransformConfig {
        auto_augment: Some("rand-m9-mstd0.5-inc1".into()),
        ..TransformConfig::train(32)
    };
    let t = Transform::new(&cfg).unwrap();
    let img = photo_like(0);
    let a = t.apply(&img, &mut rng(5)).unwrap();
    let b = t.apply(&img, &mut rng(5)).unwrap();
    let c = t.apply(&img, &mut rng(6)).unwrap();
    assert_eq!(a.len(), 3 * 32 * 32);
    assert_eq!(a, b, "same seed, same output");
    assert_ne!(a, c, "another seed, another crop");
    // Without erasing every value is a normalized 8-bit value.
    for (i, v) in a.iter().enumerate() {
        let ch = i / (32 * 32);
        let lo = (0.0 - cfg.mean[ch]) / cfg.std[ch];
        let hi = (1.0 - cfg.mean[ch]) / cfg.std[ch];
        assert!(
            (lo - 1e-5..=hi + 1e-5).contains(&(*v as f64)),
            "{v} outside [{lo}, {hi}]"
        );
    }
    // The image stage returns size x size.
    let im = t.apply_image(&img, &mut rng(5)).unwrap();
    assert_eq!(im.dimensions(), (32, 32));
}

#[test]
fn train_transform_without_randomness_is_resize_and_normalize() {
    // scale = ratio = (1, 1), no flip, no jitter: RandomResizedCrop takes the whole (square)
    // image, so the transform is a plain resize.
    let cfg = TransformConfig {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        hflip: 0.0,
        color_jitter: 0.0,
        interpolation: Interpolation::Bicubic,
        ..TransformConfig::train(24)
    };
    let img = photo_like(1);
    let got = Transform::new(&cfg)
        .unwrap()
        .apply(&img, &mut rng(0))
        .unwrap();
    let resized = ops::resize(&img, 24, 24, Resample::Bicubic).unwrap();
    let mut want = vec![0.0; 3 * 24 * 24];
    to_tensor_normalize(&resized, cfg.mean, cfg.std, &mut want);
    assert_eq!(got, want);
    // hflip = 1 always flips.
    let flip = TransformConfig {
        hflip: 1.0,
        ..cfg.clone()
    };
    let got = Transform::new(&flip)
        .unwrap()
        .apply_image(&img, &mut rng(0))
        .unwrap();
    assert_eq!(got, ops::hflip(&resized));
}

#[test]
fn eval_transform_is_resize_then_centre_crop() {
    // size 8, crop_pct 0.875: shorter side to floor(8 / 0.875) = 9, then centre crop 8.
    let cfg = TransformConfig::eval(8);
    assert_eq!(cfg.scale_size(), 9);
    let img = tiny(30, 20, |x, y, c| x * 7 + y * 3 + c * 50);
    let got = Transform::new(&cfg)
        .unwrap()
        .apply_image(&img, &mut rng(0))
        .unwrap();
    let resized = ops::resize(&img, 13, 9, Resample::Bilinear).unwrap(); // int(9 * 30 / 20) = 13
    assert_eq!(got, ops::center_crop(&resized, 8, 8));
    // The eval transform draws no random numbers: any seed gives the same tensor.
    let t = Transform::new(&cfg).unwrap();
    assert_eq!(
        t.apply(&img, &mut rng(1)).unwrap(),
        t.apply(&img, &mut rng(2)).unwrap()
    );
    // timm's fill colour for ImageNet's mean.
    assert_eq!(cfg.fill(), [124, 116, 104]);
    assert_eq!(TransformConfig::eval(224).scale_size(), 256);
}

#[test]
fn transform_config_deserializes_with_timm_names_and_defaults() {
    let cfg: TransformConfig = toml::from_str(
        r#"
        size = 160
        is_training = true
        interpolation = "bicubic"
        auto_augment = "rand-m9-mstd0.5"
        re_prob = 0.25
        re_mode = "pixel"
        scale = [0.35, 1.0]
        "#,
    )
    .unwrap();
    assert_eq!(cfg.size, 160);
    assert_eq!(cfg.interpolation, Interpolation::Bicubic);
    assert_eq!(cfg.re_mode, EraseMode::Pixel);
    assert_eq!(cfg.scale, (0.35, 1.0));
    assert_eq!(cfg.crop_pct, 0.875, "unset fields keep timm's defaults");
    assert_eq!(cfg.hflip, 0.5);
    assert!(Transform::new(&cfg).is_ok());
    let json: TransformConfig = serde_json::from_str(r#"{"re_mode": "const"}"#).unwrap();
    assert_eq!(json.re_mode, EraseMode::Const);
    assert!(toml::from_str::<TransformConfig>("colour_jitter = 0.1").is_err());
    assert!(toml::from_str::<TransformConfig>("interpolation = \"lanczos\"").is_err());
    // Invalid values are caught when the transform is built.
    for bad in [
        TransformConfig {
            scale: (0.5, 0.1),
            ..Default::default()
        },
        TransformConfig {
            hflip: 1.5,
            ..Default::default()
        },
        TransformConfig {
            size: 0,
            ..Default::default()
        },
        TransformConfig {
            auto_augment: Some("rand-q9".into()),
            ..Default::default()
        },
        TransformConfig {
            auto_augment: Some("v9".into()),
            ..Default::default()
        },
        TransformConfig {
            auto_augment: Some("augmix-m5".into()),
            ..Default::default()
        },
    ] {
        assert!(Transform::new(&bad).is_err(), "{bad:?} accepted");
    }
}

// ---------------------------------------------------------------------------------------------
// RandAugment / AutoAugment

#[test]
fn rand_augment_config_strings_parse_like_timm() {
    let hp = AugmentHparams::default();
    let ra = RandAugment::from_config_str("rand-m9-mstd0.5", hp).unwrap();
    assert_eq!(ra.num_layers, 2);
    assert_eq!(ra.ops.len(), 15);
    assert_eq!(
        ra.ops.iter().map(|o| o.name).collect::<Vec<_>>(),
        RAND_TRANSFORMS
    );
    assert!(ra.ops.iter().all(|o| o.magnitude == 9.0 && o.prob == 0.5));
    assert!(ra.ops.iter().all(|o| o.hparams.magnitude_std == 0.5));
    assert!(ra.choice_weights.is_none());

    let ra = RandAugment::from_config_str("rand-m7-n3-mstd101-inc1-p0.8-mmax12", hp).unwrap();
    assert_eq!(ra.num_layers, 3);
    assert_eq!(
        ra.ops.iter().map(|o| o.name).collect::<Vec<_>>(),
        RAND_INCREASING_TRANSFORMS
    );
    assert!(ra.ops.iter().all(|o| o.prob == 0.8 && o.magnitude == 7.0));
    assert_eq!(
        ra.ops[0].hparams.magnitude_std,
        f64::INFINITY,
        "mstd > 100 means uniform"
    );
    assert_eq!(ra.ops[0].hparams.magnitude_max, Some(12.0));

    let ra = RandAugment::from_config_str("rand-w0", hp).unwrap();
    assert_eq!(
        ra.ops[0].magnitude, 10.0,
        "default magnitude is _LEVEL_DENOM"
    );
    let w = ra.choice_weights.as_ref().unwrap();
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    // Weighted choice is without replacement and never picks a zero-weight op.
    for s in 0..50 {
        let picked = ra.choose(&mut rng(s));
        assert_eq!(picked.len(), 2);
        assert_ne!(picked[0], picked[1]);
        assert!(picked.iter().all(|&k| w[k] > 0.0));
    }
    assert!(RandAugment::from_config_str("rand-m9-zz3", hp).is_err());
    assert!(RandAugment::from_config_str("randaug-m9", hp).is_err());
}

#[test]
fn auto_augment_policies_parse() {
    let hp = AugmentHparams::default();
    for name in [
        "original",
        "originalr",
        "v0",
        "v0r",
        "autoaug",
        "original-mstd0.5",
    ] {
        let aa = AutoAugment::from_config_str(name, hp).unwrap();
        assert_eq!(aa.policy.len(), 25, "{name}");
        assert!(aa.policy.iter().all(|sub| sub.len() == 2));
    }
    let aa = AutoAugment::from_config_str("original-mstd0.5", hp).unwrap();
    assert_eq!(aa.policy[0][0].name, OpName::PosterizeOriginal);
    assert_eq!(
        (aa.policy[0][1].name, aa.policy[0][1].prob),
        (OpName::Rotate, 0.6)
    );
    assert_eq!(aa.policy[0][0].hparams.magnitude_std, 0.5);
    assert!(AutoAugment::from_config_str("v1", hp).is_err());
    // Deterministic by seed, and it does change images.
    let img = photo_like(2);
    let a = aa.apply(&img, &mut rng(3));
    assert_eq!(a, aa.apply(&img, &mut rng(3)));
    assert!((0..20).any(|s| aa.apply(&img, &mut rng(s)) != img));
}

#[test]
fn op_levels_follow_timm_magnitude_scale() {
    let img = photo_like(3);
    let hp = AugmentHparams {
        fill: FILL,
        interpolation: Some(Resample::Bilinear),
        ..Default::default()
    };
    let at = |name, m| apply_op(name, &img, m, &hp, &mut rng(0));
    // Posterize: int(m / 10 * 4) bits; m9 -> 3.
    assert_eq!(at(OpName::Posterize, 9.0), ops::posterize(&img, 3));
    assert_eq!(
        at(OpName::PosterizeIncreasing, 9.0),
        ops::posterize(&img, 1)
    );
    assert_eq!(at(OpName::PosterizeOriginal, 9.0), ops::posterize(&img, 7));
    // Solarize: threshold int(m / 10 * 256); m9 -> 230.
    assert_eq!(at(OpName::Solarize, 9.0), ops::solarize(&img, 230));
    assert_eq!(at(OpName::SolarizeIncreasing, 9.0), ops::solarize(&img, 26));
    // SolarizeAdd: int(m / 10 * 110) added below 128; m5 -> 55.
    assert_eq!(
        at(OpName::SolarizeAdd, 5.0),
        ops::solarize_add(&img, 55, 128)
    );
    // Each of `names` at magnitude `m` is the identity.
    let identity_at = |names: [OpName; 4], m: f64| {
        for name in names {
            assert_eq!(at(name, m), img, "{name:?} at m{m}");
        }
    };
    // Enhancers: factor m / 10 * 1.8 + 0.1; m5 -> 1.0, the identity.
    identity_at(
        [
            OpName::Color,
            OpName::Contrast,
            OpName::Brightness,
            OpName::Sharpness,
        ],
        5.0,
    );
    assert_eq!(
        at(OpName::Brightness, 0.0),
        ops::enhance_brightness(&img, 0.1)
    );
    // Geometric ops at m0 are the identity whatever the sign.
    identity_at(
        [
            OpName::Rotate,
            OpName::ShearX,
            OpName::ShearY,
            OpName::TranslateXRel,
        ],
        0.0,
    );
    // Rotate m10 is +-30 degrees.
    let r = at(OpName::Rotate, 10.0);
    let plus = ops::rotate(&img, 30.0, Resample::Bilinear, FILL);
    let minus = ops::rotate(&img, -30.0, Resample::Bilinear, FILL);
    assert!(r == plus || r == minus);
    // Probability 0 never applies; 1 always does.
    let never = AugmentOp::new(OpName::Invert, 0.0, 5.0, hp);
    let always = AugmentOp::new(OpName::Invert, 1.0, 5.0, hp);
    assert_eq!(never.apply(&img, &mut rng(0)), img);
    assert_eq!(always.apply(&img, &mut rng(0)), ops::invert(&img));
}

// ---------------------------------------------------------------------------------------------
// RandomErasing

#[test]
fn random_erasing_changes_one_box_at_p1_and_nothing_at_p0() {
    let (c, h, w) = (3, 40, 50);
    let base: Vec<f32> = (0..c * h * w)
        .map(|i| (i % 97) as f32 * 0.01 + 10.0)
        .collect();
    for mode in [EraseMode::Pixel, EraseMode::Const, EraseMode::Rand] {
        let re = RandomErasing {
            probability: 1.0,
            mode,
            ..Default::default()
        };
        for seed in 0..20 {
            let mut img = base.clone();
            let boxes = re.apply(&mut img, c, h, w, &mut rng(seed));
            assert_eq!(boxes.len(), 1, "p = 1 erases");
            let (top, left, bh, bw) = boxes[0];
            let area = (bh * bw) as f64 / (h * w) as f64;
            assert!((0.015..=0.36).contains(&area), "area {area}");
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let i = (ch * h + y) * w + x;
                        let inside = (top..top + bh).contains(&y) && (left..left + bw).contains(&x);
                        if !inside {
                            assert_eq!(img[i], base[i]);
                            continue;
                        }
                        match mode {
                            EraseMode::Const => assert_eq!(img[i], 0.0),
                            // Base values are >= 10; N(0, 1) noise never is (in practice).
                            _ => assert!(img[i] < 10.0),
                        }
                    }
                }
                if mode == EraseMode::Rand {
                    // One colour per channel for the whole box.
                    let first = img[(ch * h + top) * w + left];
                    let last = img[(ch * h + top + bh - 1) * w + left + bw - 1];
                    assert_eq!(first, last);
                }
            }
        }
    }
    let re = RandomErasing {
        probability: 0.0,
        ..Default::default()
    };
    let mut img = base.clone();
    assert!(re.apply(&mut img, c, h, w, &mut rng(0)).is_empty());
    assert_eq!(img, base);
    // Several boxes, each of area / count.
    let re = RandomErasing {
        probability: 1.0,
        min_count: 3,
        max_count: 3,
        ..Default::default()
    };
    let mut img = base.clone();
    assert_eq!(re.apply(&mut img, c, h, w, &mut rng(1)).len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Mixup / CutMix / label smoothing

fn batch_of(b: usize, c: usize, h: usize, w: usize) -> Tensor<f32> {
    let data = (0..b * c * h * w)
        .map(|i| (i / (c * h * w)) as f32 + (i % 7) as f32 * 0.1)
        .collect();
    Tensor::new(&[b, c, h, w], data)
}

#[test]
fn label_smoothing_closed_form() {
    let t = one_hot_smoothed(&[2, 0], 4, 0.1);
    assert_eq!(t.shape(), &[2, 4]);
    // timm computes on/off values in double precision, then fills an f32 tensor.
    let (off, on) = ((0.1f64 / 4.0) as f32, (1.0 - 0.1f64 + 0.1 / 4.0) as f32);
    assert_eq!(t.data(), &[off, off, on, off, on, off, off, off]);
    for row in t.data().chunks(4) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    assert_eq!(one_hot_smoothed(&[1], 3, 0.0).data(), &[0.0, 1.0, 0.0]);
}

#[test]
fn mixup_with_known_lam_gives_known_mix() {
    let orig = batch_of(4, 2, 3, 3);
    let mut x = orig.clone();
    mix_with_flipped(&mut x, 0.7);
    let per = 2 * 3 * 3;
    for i in 0..4 {
        let j = 3 - i;
        for k in 0..per {
            let want = orig.data()[i * per + k] * 0.7 + orig.data()[j * per + k] * 0.3f32;
            assert_eq!(x.data()[i * per + k], want);
        }
    }
    // Targets: lam on the own label, 1 - lam on the flipped one, each smoothed.
    let t = mixup_target(&[0, 1, 2, 3], 4, 0.7, 0.0);
    assert_eq!(&t.data()[0..4], &[0.7, 0.0, 0.0, 0.3]);
    let t = mixup_target(&[0, 1], 2, 0.25, 0.2);
    // smoothed one-hots: on 0.9, off 0.1; row 0 = 0.25 [0.9, 0.1] + 0.75 [0.1, 0.9]
    assert!((t.data()[0] - (0.25 * 0.9 + 0.75 * 0.1)).abs() < 1e-6);
    assert!((t.data()[1] - (0.25 * 0.1 + 0.75 * 0.9)).abs() < 1e-6);
}

#[test]
fn cutmix_corrects_lam_by_the_clipped_box_area() {
    for seed in 0..50 {
        let ((yl, yh, xl, xh), lam) = cutmix_bbox_and_lam(20, 30, 0.6, None, true, &mut rng(seed));
        assert!(yl <= yh && yh <= 20 && xl <= xh && xh <= 30);
        let area = ((yh - yl) * (xh - xl)) as f64;
        assert_eq!(lam, 1.0 - area / 600.0);
        // The unclipped box would be int(20 sqrt(0.4)) x int(30 sqrt(0.4)) = 12 x 18.
        assert!(yh - yl <= 12 && xh - xl <= 18);
        let (_, raw) = cutmix_bbox_and_lam(20, 30, 0.6, None, false, &mut rng(seed));
        assert_eq!(raw, 0.6);
    }
    // The paste: inside the box image i holds image B-1-i, outside it is unchanged.
    let orig = batch_of(2, 1, 4, 5);
    let mut x = orig.clone();
    cut_from_flipped(&mut x, (1, 3, 2, 5));
    for y in 0..4 {
        for xx in 0..5 {
            let inside = (1..3).contains(&y) && (2..5).contains(&xx);
            let src = if inside { 1 } else { 0 };
            assert_eq!(x.data()[y * 5 + xx], orig.data()[src * 20 + y * 5 + xx]);
        }
    }
}

#[test]
fn mixup_apply_in_batch_mode() {
    let labels = [0, 1, 2, 3];
    // CutMix only: lam matches the pasted area; targets mix the flipped labels with it.
    let cutmix = Mixup {
        mixup_alpha: 0.0,
        cutmix_alpha: 1.0,
        label_smoothing: 0.1,
        ..Mixup::new(5)
    };
    for seed in 0..10 {
        let mut x = batch_of(4, 3, 8, 8);
        let out = cutmix.apply(&mut x, &labels, &mut rng(seed)).unwrap();
        let (yl, yh, xl, xh) = out.cutmix_box.expect("cutmix");
        assert_eq!(out.lam, 1.0 - ((yh - yl) * (xh - xl)) as f64 / 64.0);
        assert_eq!(out.targets.shape(), &[4, 5]);
        let want = mixup_target(&labels, 5, out.lam, 0.1);
        assert_eq!(out.targets.data(), want.data());
    }
    // prob 0: nothing mixed, targets are smoothed one-hots.
    let off = Mixup {
        prob: 0.0,
        label_smoothing: 0.1,
        ..Mixup::new(5)
    };
    let mut x = batch_of(4, 3, 8, 8);
    let out = off.apply(&mut x, &labels, &mut rng(0)).unwrap();
    assert_eq!(out.lam, 1.0);
    assert_eq!(x.data(), batch_of(4, 3, 8, 8).data());
    assert_eq!(out.targets.data(), one_hot_smoothed(&labels, 5, 0.1).data());
    // Mixup only: the batch is the lam-blend, reproducible by seed.
    let mix = Mixup::new(5);
    let mut x1 = batch_of(4, 3, 8, 8);
    let mut x2 = batch_of(4, 3, 8, 8);
    let o1 = mix.apply(&mut x1, &labels, &mut rng(9)).unwrap();
    let o2 = mix.apply(&mut x2, &labels, &mut rng(9)).unwrap();
    assert_eq!(o1.lam, o2.lam);
    assert_eq!(x1.data(), x2.data());
    let mut want = batch_of(4, 3, 8, 8);
    mix_with_flipped(&mut want, o1.lam);
    assert_eq!(x1.data(), want.data());
    // Errors: labels out of range, wrong count, no classes.
    assert!(mix
        .apply(&mut batch_of(2, 1, 2, 2), &[0, 7], &mut rng(0))
        .is_err());
    assert!(mix
        .apply(&mut batch_of(2, 1, 2, 2), &[0], &mut rng(0))
        .is_err());
    assert!(Mixup::default()
        .apply(&mut batch_of(2, 1, 2, 2), &[0, 0], &mut rng(0))
        .is_err());
}

// ---------------------------------------------------------------------------------------------
// Datasets

/// A fresh, empty temporary folder for one test (removed by the test when it passes).
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ghostv3-data-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

// An 8x8 CMYK JPEG (Adobe APP14, inverted CMYK as Photoshop writes it), made by Pillow 13:
//   a = np.zeros((8, 8, 4), np.uint8); a[:, :4] = [0, 255, 255, 0]; a[:, 4:] = [200, 50, 0, 30]
//   Image.fromarray(a, 'CMYK').save(buf, 'JPEG', quality=100)
// Pillow decodes it, .convert('RGB'), to (255, 0, 0) on the left and (49, 181, 225) on the right.
#[rustfmt::skip]
const CMYK_JPEG: [u8; 406] = [
    0xff, 0xd8, 0xff, 0xee, 0x00, 0x0e, 0x41, 0x64, 0x6f, 0x62, 0x65, 0x00, 0x64, 0x00, 0x00,
    0x00, 0x00, 0x00, 0xff, 0xdb, 0x00, 0x43, 0x00, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0xff, 0xc0, 0x00,
    0x14, 0x08, 0x00, 0x08, 0x00, 0x08, 0x04, 0x43, 0x11, 0x00, 0x4d, 0x11, 0x00, 0x59, 0x11,
    0x00, 0x4b, 0x11, 0x00, 0xff, 0xc4, 0x00, 0x1f, 0x00, 0x00, 0x01, 0x05, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04,
    0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0xff, 0xc4, 0x00, 0xb5, 0x10, 0x00, 0x02, 0x01,
    0x03, 0x03, 0x02, 0x04, 0x03, 0x05, 0x05, 0x04, 0x04, 0x00, 0x00, 0x01, 0x7d, 0x01, 0x02,
    0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22,
    0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27,
    0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47,
    0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66,
    0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85,
    0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2,
    0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8,
    0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5,
    0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea,
    0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xff, 0xda, 0x00, 0x0e, 0x04,
    0x43, 0x00, 0x4d, 0x00, 0x59, 0x00, 0x4b, 0x00, 0x00, 0x3f, 0x00, 0xfb, 0x63, 0xfe, 0x0e,
    0xd5, 0xff, 0x00, 0x9b, 0x00, 0xff, 0x00, 0xbb, 0xaa, 0xff, 0x00, 0xdf, 0x6f, 0xaf, 0x8c,
    0xff, 0x00, 0xe0, 0xd1, 0x8f, 0xf9, 0xc8, 0x2f, 0xfd, 0xda, 0x87, 0xfe, 0xfc, 0xa5, 0x47,
    0xff, 0x00, 0x06, 0x31, 0xff, 0x00, 0xce, 0x51, 0x7f, 0xee, 0xc9, 0xbf, 0xf7, 0xee, 0x2b,
    0xfb, 0x80, 0xf8, 0xdb, 0xff, 0x00, 0x32, 0xcf, 0xfd, 0xc6, 0xbf, 0xf7, 0x13, 0x5f, 0xff,
    0xd9
];

#[test]
fn image_folder_reads_every_format_as_rgb_and_reports_bad_files() {
    let root = temp_dir("folder");
    let (cat, dog) = (root.join("cat"), root.join("dog"));
    fs::create_dir_all(cat.join("nested")).unwrap();
    fs::create_dir_all(&dog).unwrap();
    tiny(16, 12, |x, y, c| x * 9 + y * 5 + c * 80)
        .save(cat.join("a.jpg"))
        .unwrap();
    image::GrayImage::from_fn(10, 8, |x, y| image::Luma([(x * 20 + y) as u8]))
        .save(cat.join("gray.jpeg"))
        .unwrap();
    image::RgbaImage::from_pixel(5, 4, image::Rgba([10, 20, 30, 40]))
        .save(cat.join("nested/rgba.png"))
        .unwrap();
    image::ImageBuffer::<image::LumaA<u8>, Vec<u8>>::from_pixel(3, 3, image::LumaA([77, 9]))
        .save(dog.join("graya.png"))
        .unwrap();
    tiny(8, 8, |x, _, _| x * 30)
        .save(dog.join("UPPER.JPG"))
        .unwrap();
    fs::write(dog.join("bad.jpg"), b"this is not a jpeg").unwrap();
    fs::write(dog.join("cmyk.jpg"), CMYK_JPEG).unwrap();
    fs::write(dog.join("notes.txt"), b"ignored").unwrap();

    let ds = ImageFolder::open(&root).unwrap();
    assert_eq!(ds.class_names(), ["cat", "dog"]);
    assert_eq!(ds.num_classes(), 2);
    assert_eq!(
        ds.len(),
        7,
        "jpg, jpeg, png in any case, recursively; not .txt"
    );
    let names: Vec<String> = (0..ds.len())
        .map(|i| {
            Path::new(&ds.describe(i))
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // Sorted by class, then by path (byte order: upper case first).
    assert_eq!(
        names,
        [
            "a.jpg",
            "gray.jpeg",
            "rgba.png",
            "UPPER.JPG",
            "bad.jpg",
            "cmyk.jpg",
            "graya.png"
        ]
    );
    assert_eq!(
        (0..7).map(|i| ds.label(i)).collect::<Vec<_>>(),
        [0, 0, 0, 1, 1, 1, 1]
    );

    let gray = ds.load(1).unwrap();
    assert_eq!(gray.dimensions(), (10, 8));
    assert!(
        gray.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
        "gray expands to R = G = B"
    );
    let rgba = ds.load(2).unwrap();
    assert!(
        rgba.pixels().all(|p| p.0 == [10, 20, 30]),
        "alpha is dropped, as PIL's convert"
    );
    assert!(ds.load(6).unwrap().pixels().all(|p| p.0 == [77, 77, 77]));
    assert_eq!(ds.load(0).unwrap().dimensions(), (16, 12));

    let err = format!("{:#}", ds.load(4).unwrap_err());
    assert!(err.contains("bad.jpg"), "error names the file: {err}");

    // CMYK: the JPEG decoder converts to RGB; compare with Pillow (JPEG decoders round a little
    // differently, so allow a few levels).
    let cmyk = ds.load(5).unwrap();
    for (x, want) in [(0, [255i32, 0, 0]), (7, [49, 181, 225])] {
        let got = cmyk.get_pixel(x, 3).0.map(|v| v as i32);
        let diff = (0..3).map(|c| (got[c] - want[c]).abs()).max().unwrap();
        assert!(diff <= 4, "CMYK pixel {x}: got {got:?}, Pillow {want:?}");
    }
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn image_folder_errors_name_the_path() {
    let missing = std::env::temp_dir().join("ghostv3-data-does-not-exist");
    let err = format!("{:#}", ImageFolder::open(&missing).err().unwrap());
    assert!(err.contains("does-not-exist"), "{err}");

    let empty = temp_dir("empty");
    let err = format!("{:#}", ImageFolder::open(&empty).err().unwrap());
    assert!(
        err.contains("no class sub-folders") && err.contains("empty"),
        "{err}"
    );

    fs::create_dir_all(empty.join("a")).unwrap();
    fs::write(empty.join("a/readme.txt"), b"x").unwrap();
    let err = format!("{:#}", ImageFolder::open(&empty).err().unwrap());
    assert!(err.contains("no images"), "{err}");

    // One class with images and one without.
    tiny(4, 4, |_, _, _| 0).save(empty.join("a/x.png")).unwrap();
    fs::create_dir_all(empty.join("b")).unwrap();
    let err = format!("{:#}", ImageFolder::open(&empty).err().unwrap());
    assert!(err.contains("without images") && err.contains('b'), "{err}");
    fs::remove_dir_all(&empty).unwrap();
}

/// Opens an ImageFolder on another thread, failing (not hanging) if it takes over 60 s.
fn open_within_a_minute(root: &Path) -> Result<ImageFolder> {
    let (tx, rx) = std::sync::mpsc::channel();
    let root = root.to_path_buf();
    std::thread::spawn(move || tx.send(ImageFolder::open(&root)));
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("ImageFolder::open hangs: a symlink loop?")
}

/// The (path under the root, label) of every sample.
fn listing(ds: &ImageFolder, root: &Path) -> Vec<(String, usize)> {
    (0..ds.len())
        .map(|i| {
            let (p, label) = ds.sample(i);
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, label)
        })
        .collect()
}

/// Symlinks are followed without loops: links to the root, to the class folder and above the
/// root neither hang nor multiply or relabel images; a file reached twice in a class counts once;
/// a link to another class's folder does not relabel its images; a link out of the dataset is
/// followed.
#[test]
fn image_folder_follows_symlinks_without_loops() {
    use std::os::unix::fs::symlink;
    let root = temp_dir("links");
    let outside = temp_dir("links-outside");
    let (cat, dog) = (root.join("cat"), root.join("dog"));
    fs::create_dir_all(cat.join("sub")).unwrap();
    fs::create_dir_all(dog.join("inner")).unwrap();
    let png = |p: PathBuf| tiny(4, 4, |x, y, c| x + y + c).save(p).unwrap();
    png(cat.join("a.png"));
    png(cat.join("sub/b.png"));
    png(dog.join("d.png"));
    png(dog.join("inner/e.png"));
    png(outside.join("o.png"));
    symlink("..", cat.join("loop")).unwrap(); // the root: the classic loop
    symlink(".", cat.join("self")).unwrap(); // the class folder itself
    symlink("..", cat.join("sub/up")).unwrap(); // a second loop, back to cat
    symlink("../..", dog.join("above")).unwrap(); // above the root
    symlink("a.png", cat.join("same.png")).unwrap(); // one file, two names
    symlink("../../dog/inner", cat.join("sub/dogs")).unwrap(); // into another class
    symlink(&outside, dog.join("more")).unwrap(); // out of the dataset: followed
    let ds = open_within_a_minute(&root).unwrap();
    assert_eq!(ds.class_names(), ["cat", "dog"]);
    assert_eq!(
        listing(&ds, &root),
        [
            ("cat/a.png".to_string(), 0),
            ("cat/sub/b.png".to_string(), 0),
            ("dog/d.png".to_string(), 1),
            ("dog/inner/e.png".to_string(), 1),
            ("dog/more/o.png".to_string(), 1),
        ]
    );
    // A class folder that is itself a link to the root is refused, naming it.
    symlink(".", root.join("everything")).unwrap();
    let err = format!("{:#}", open_within_a_minute(&root).err().unwrap());
    assert!(err.contains("everything") && err.contains("loop"), "{err}");
    fs::remove_dir_all(&root).unwrap();
    fs::remove_dir_all(&outside).unwrap();
}

/// CIFAR-10 records: label, then 3 x 32 x 32 bytes, channel-major.
fn cifar_records(labels: &[u8], seed: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for (r, &l) in labels.iter().enumerate() {
        out.push(l);
        out.extend((0..3072).map(|i| (i as u32 * 7 + r as u32 * 13 + seed as u32) as u8));
    }
    out
}

#[test]
fn cifar10_reads_the_binary_format() {
    let dir = temp_dir("cifar");
    for k in 1..=5u8 {
        fs::write(
            dir.join(format!("data_batch_{k}.bin")),
            cifar_records(&[k, 9 - k], k),
        )
        .unwrap();
    }
    fs::write(dir.join("test_batch.bin"), cifar_records(&[3, 1, 4], 0)).unwrap();
    let train = Cifar10::open(&dir, true).unwrap();
    assert_eq!(train.len(), 10);
    assert_eq!(train.num_classes(), 10);
    assert_eq!(
        train.class_names()[0],
        "airplane",
        "standard names without batches.meta.txt"
    );
    assert_eq!(
        (0..10).map(|i| train.label(i)).collect::<Vec<_>>(),
        [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    );
    // Record 1 of data_batch_2 is sample 3: pixel (x, y) channel c is byte c * 1024 + y * 32 + x.
    let img = train.load(3).unwrap();
    assert_eq!(img.dimensions(), (32, 32));
    let byte = |i: u32| (i * 7 + 13 + 2) as u8;
    assert_eq!(
        img.get_pixel(5, 2).0,
        [0, 1, 2].map(|c| byte(c * 1024 + 2 * 32 + 5))
    );
    assert!(
        train.describe(3).contains("data_batch_2.bin") && train.describe(3).contains("record 1")
    );

    let names: Vec<String> = (0..10).map(|i| format!("class{i}")).collect();
    fs::write(dir.join("batches.meta.txt"), names.join("\n") + "\n\n").unwrap();
    let test = Cifar10::open(&dir, false).unwrap();
    assert_eq!(test.len(), 3);
    assert_eq!(test.class_names(), names);

    // Wrong sizes and bad labels are errors naming the file.
    fs::write(dir.join("test_batch.bin"), vec![0u8; 3074]).unwrap();
    let err = format!("{:#}", Cifar10::open(&dir, false).err().unwrap());
    assert!(
        err.contains("test_batch.bin") && err.contains("3074"),
        "{err}"
    );
    fs::write(dir.join("test_batch.bin"), cifar_records(&[10], 0)).unwrap();
    assert!(Cifar10::open(&dir, false).is_err());
    fs::remove_file(dir.join("data_batch_4.bin")).unwrap();
    let err = format!("{:#}", Cifar10::open(&dir, true).err().unwrap());
    assert!(err.contains("data_batch_4.bin"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn synthetic_is_deterministic_balanced_and_varied() {
    let ds = Synthetic::new(200, 48, 3);
    assert_eq!(ds.num_classes(), 10);
    let mut counts = [0; 10];
    for i in 0..200 {
        counts[ds.label(i)] += 1;
    }
    assert_eq!(counts, [20; 10]);
    let a = ds.load(17).unwrap();
    assert_eq!(a.dimensions(), (48, 48));
    assert_eq!(
        a,
        Synthetic::new(200, 48, 3).load(17).unwrap(),
        "a function of (seed, index)"
    );
    assert_ne!(
        a,
        Synthetic::new(200, 48, 4).load(17).unwrap(),
        "another seed, another image"
    );
    assert_ne!(
        ds.load(7).unwrap(),
        ds.load(17).unwrap(),
        "same class, different drawing"
    );
    assert!(ds.load(200).is_err());
    // Not a flat image: shapes and noise give a real spread of values.
    let (lo, hi) = a
        .as_raw()
        .iter()
        .fold((255, 0), |(l, h), &v| (l.min(v), h.max(v)));
    assert!(hi - lo > 60, "{lo}..{hi}");
}

// ---------------------------------------------------------------------------------------------
// Loader

/// A dataset whose samples in `bad` fail to load like a corrupt file.
struct Flaky {
    inner: Synthetic,
    bad: HashSet<usize>,
}

impl Dataset for Flaky {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn label(&self, i: usize) -> usize {
        self.inner.label(i)
    }
    fn load(&self, i: usize) -> Result<RgbImage> {
        if self.bad.contains(&i) {
            return Err(anyhow!(
                "cannot decode image /data/img{i}.jpg: corrupt marker"
            ));
        }
        self.inner.load(i)
    }
    fn describe(&self, i: usize) -> String {
        format!("/data/img{i}.jpg")
    }
}

fn small_train() -> TransformConfig {
    TransformConfig {
        auto_augment: Some("rand-m9-mstd0.5".into()),
        re_prob: 0.25,
        ..TransformConfig::train(16)
    }
}

fn collect(loader: &Loader, epoch: usize) -> Vec<ghostv3::data::Batch> {
    loader.epoch(epoch).map(|b| b.unwrap()).collect()
}

#[test]
fn loader_yields_ordered_batches_with_labels() {
    let ds: Arc<dyn Dataset> = Arc::new(Synthetic::new(23, 24, 0));
    let loader = Loader::new(ds.clone(), TransformConfig::eval(16), 5, false, false, 2, 0).unwrap();
    assert_eq!(loader.batches_per_epoch(), 5);
    let batches = collect(&loader, 0);
    assert_eq!(batches.len(), 5);
    assert_eq!(
        batches[4].len(),
        3,
        "the partial batch is kept without drop_last"
    );
    let indices: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(indices, (0..23).collect::<Vec<_>>());
    for b in &batches {
        assert_eq!(b.images.shape(), &[b.len(), 3, 16, 16]);
        assert_eq!(
            b.labels,
            b.indices.iter().map(|&i| ds.label(i)).collect::<Vec<_>>()
        );
        assert!(b.skipped.is_empty());
    }
    // Each image is the transform of its sample.
    let t = Transform::new(&TransformConfig::eval(16)).unwrap();
    let want = t.apply(&ds.load(7).unwrap(), &mut rng(0)).unwrap();
    assert_eq!(&batches[1].images.data()[2 * 768..3 * 768], want.as_slice());

    let dropping = Loader::new(ds, TransformConfig::eval(16), 5, false, true, 2, 0).unwrap();
    assert_eq!(dropping.batches_per_epoch(), 4);
    let batches = collect(&dropping, 0);
    assert_eq!(batches.len(), 4);
    assert!(batches.iter().all(|b| b.len() == 5));
}

#[test]
fn shuffle_differs_per_epoch_and_results_do_not_depend_on_threads() {
    let ds: Arc<dyn Dataset> = Arc::new(Synthetic::new(40, 24, 1));
    let make =
        |workers| Loader::new(ds.clone(), small_train(), 8, true, true, workers, 42).unwrap();
    let (two, none, three) = (make(2), make(0), make(3));
    let e0 = two.order(0);
    assert_ne!(e0, two.order(1), "each epoch has its own order");
    assert_eq!(
        e0,
        make(2).order(0),
        "the order is a function of (seed, epoch)"
    );
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..40).collect::<Vec<_>>());
    let other_seed = Loader::new(ds.clone(), small_train(), 8, true, true, 2, 43).unwrap();
    assert_ne!(e0, other_seed.order(0));

    // Bit-identical batches with 0, 2 or 3 worker threads, and on a second run.
    let a = collect(&two, 1);
    for other in [collect(&none, 1), collect(&three, 1), collect(&two, 1)] {
        assert_eq!(a.len(), other.len());
        for (x, y) in a.iter().zip(&other) {
            assert_eq!(x.indices, y.indices);
            assert_eq!(x.images.data(), y.images.data());
        }
    }
    // Augmentation differs between epochs for the same sample.
    let b = collect(&two, 2);
    assert_ne!(a[0].images.data(), b[0].images.data());

    // Resuming mid-epoch gives the remaining batches exactly.
    let resumed: Vec<_> = two.epoch_from(1, 3).map(|b| b.unwrap()).collect();
    assert_eq!(resumed.len(), a.len() - 3);
    assert_eq!(resumed[0].images.data(), a[3].images.data());
    assert_eq!(
        two.load_batch(1, 2).unwrap().images.data(),
        a[2].images.data()
    );

    // Stopping early is fine (the workers are told to stop).
    let first = two.epoch(0).next().unwrap().unwrap();
    assert_eq!(first.len(), 8);
}

#[test]
fn corrupt_samples_are_skipped_or_fail_in_strict_mode() {
    let ds: Arc<dyn Dataset> = Arc::new(Flaky {
        inner: Synthetic::new(12, 20, 0),
        bad: [2, 9].into_iter().collect(),
    });
    let loader = Loader::new(ds.clone(), small_train(), 4, false, false, 2, 0).unwrap();
    let batches = collect(&loader, 0);
    assert_eq!(
        batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
        [3, 4, 3]
    );
    assert_eq!(batches[0].indices, [0, 1, 3]);
    assert_eq!(batches[0].images.shape(), &[3, 3, 16, 16]);
    assert_eq!(batches[0].skipped.len(), 1);
    assert!(
        batches[0].skipped[0].contains("/data/img2.jpg"),
        "{:?}",
        batches[0].skipped
    );
    assert!(batches[2].skipped[0].contains("img9.jpg"));

    let strict = Loader::new(ds, small_train(), 4, false, false, 2, 0)
        .unwrap()
        .strict(true);
    let results: Vec<_> = strict.epoch(0).collect();
    assert_eq!(results.len(), 3);
    let err = format!("{:#}", results[0].as_ref().unwrap_err());
    assert!(
        err.contains("/data/img2.jpg"),
        "strict error names the file: {err}"
    );
    assert!(results[1].is_ok());
    assert!(results[2].is_err());
}

// ---------------------------------------------------------------------------------------------
// Imagenette (CI has it at ../shared/data/imagenette2-224)

fn imagenette() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/imagenette2-224");
    if root.join("train").is_dir() && root.join("val").is_dir() {
        Some(root)
    } else {
        println!("skipped: {} not found", root.display());
        None
    }
}

#[test]
fn imagenette_counts_and_decoding() {
    let Some(root) = imagenette() else { return };
    let train = ImageFolder::open(root.join("train")).unwrap();
    let val = ImageFolder::open(root.join("val")).unwrap();
    assert_eq!(train.len(), 9469);
    assert_eq!(val.len(), 3925);
    assert_eq!(train.num_classes(), 10);
    let wnids = [
        "n01440764",
        "n02102040",
        "n02979186",
        "n03000684",
        "n03028079",
        "n03394916",
        "n03417042",
        "n03425413",
        "n03445777",
        "n03888257",
    ];
    assert_eq!(train.class_names(), wnids);
    assert_eq!(val.class_names(), wnids);
    // Per-class counts from the dataset's README.
    let train_counts = [963, 955, 993, 858, 941, 956, 961, 931, 951, 960];
    let val_counts = [387, 395, 357, 386, 409, 394, 389, 419, 399, 390];
    for (ds, want) in [(&train, train_counts), (&val, val_counts)] {
        let mut counts = [0; 10];
        for i in 0..ds.len() {
            counts[ds.label(i)] += 1;
        }
        assert_eq!(counts, want);
    }
    // A grayscale JPEG (one of the 242) decodes to 3 equal channels.
    let gray = (0..train.len())
        .find(|&i| train.describe(i).ends_with("n02102040_1408.JPEG"))
        .expect("the grayscale image n02102040_1408.JPEG");
    let raw = image::open(train.sample(gray).0).unwrap();
    assert_eq!(
        raw.color(),
        image::ColorType::L8,
        "it is stored as grayscale"
    );
    let img = train.load(gray).unwrap();
    assert!(img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    for i in [0, 5000, train.len() - 1] {
        let img = train.load(i).unwrap();
        assert_eq!(img.dimensions(), (224, 224));
    }
    // A few batches through the full training pipeline.
    let subset: Arc<dyn Dataset> = Arc::new(Subset::evenly_spaced(Arc::new(val), 24));
    let cfg = TransformConfig {
        auto_augment: Some("rand-m9-mstd0.5".into()),
        re_prob: 0.25,
        ..TransformConfig::train(224)
    };
    let loader = Loader::new(subset, cfg, 8, true, true, 2, 0).unwrap();
    for b in loader.epoch(0) {
        let b = b.unwrap();
        assert_eq!(b.images.shape(), &[8, 3, 224, 224]);
        assert!(b.images.is_finite());
    }
}

#[test]
fn an_image_declaring_a_huge_side_is_refused_before_decoding() {
    let d = std::env::temp_dir().join(format!("ghostv3-huge-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("wide.png");
    // A valid 1 x (MAX + 1) PNG: tiny on disk, refused by its declared size.
    image::GrayImage::new(1, ghostv3::data::dataset::MAX_IMAGE_SIDE + 1)
        .save(&p)
        .unwrap();
    let e = format!("{:#}", ghostv3::data::dataset::decode_rgb(&p).unwrap_err());
    assert!(e.contains("wide.png"), "{e}");
    image::GrayImage::new(3, 5).save(d.join("ok.png")).unwrap();
    assert_eq!(
        ghostv3::data::dataset::decode_rgb(&d.join("ok.png"))
            .unwrap()
            .dimensions(),
        (3, 5)
    );
}

/// Data-parallel shards: for world sizes 2 and 4, global step g's batches across the ranks are
/// the 1-process loader's batches g*world .. (g+1)*world, images included (augmentation follows
/// the sample, not the rank); the epoch is cut to a multiple of the world size.
#[test]
fn shards_split_the_same_epoch_by_batches() {
    let ds: Arc<dyn Dataset> = Arc::new(Synthetic::new(44, 24, 1));
    let make = || Loader::new(ds.clone(), small_train(), 4, true, true, 2, 42).unwrap();
    let whole = collect(&make(), 1);
    assert_eq!(whole.len(), 11);
    for world in [2, 4] {
        let ranks: Vec<Vec<_>> = (0..world)
            .map(|r| collect(&make().shard(r, world).unwrap(), 1))
            .collect();
        let steps = 11 / world;
        for (r, batches) in ranks.iter().enumerate() {
            assert_eq!(batches.len(), steps, "rank {r} of {world}");
            assert_eq!(make().shard(r, world).unwrap().batches_per_epoch(), steps);
            for (g, b) in batches.iter().enumerate() {
                let w = &whole[g * world + r];
                assert_eq!(b.indices, w.indices, "rank {r} of {world}, step {g}");
                assert_eq!(b.images.data(), w.images.data());
            }
        }
    }
    assert!(make().shard(2, 2).is_err());
}
