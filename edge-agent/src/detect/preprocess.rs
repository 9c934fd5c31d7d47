//! Frame → model input: colour conversion, resize (stretch or letterbox), layout and type, in one
//! pass over the model's input pixels (never over the whole frame), so a 768x576 frame costs what
//! a 300x300 input costs. The input can be a region of the frame (a tile of the road, see
//! [`crate::detect::regions`]): it is then read at its own resolution, not the frame's.

use crate::decode::{Frame, Picture};
use crate::detect::manifest::{ColourOrder, InputSpec, InputType, Layout, ResizeMode};

/// The model's input tensor, reused between frames.
#[derive(Debug, Clone)]
pub enum InputTensor {
    U8 { shape: [usize; 4], data: Vec<u8> },
    F32 { shape: [usize; 4], data: Vec<f32> },
}

impl InputTensor {
    pub fn shape(&self) -> [usize; 4] {
        match self {
            InputTensor::U8 { shape, .. } | InputTensor::F32 { shape, .. } => *shape,
        }
    }
}

/// Maps model-input pixel coordinates back to source-frame pixel coordinates:
/// `src = (input - pad) * inv_scale + offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputTransform {
    pub pad_x: f32,
    pub pad_y: f32,
    pub inv_scale_x: f32,
    pub inv_scale_y: f32,
    /// Top-left corner of the region the input was read from (0, 0 for the whole frame).
    pub offset_x: f32,
    pub offset_y: f32,
    /// Size of that region, to clamp boxes to it.
    pub src_width: f32,
    pub src_height: f32,
}

impl InputTransform {
    /// A box `[x1, y1, x2, y2]` in model-input pixels → source pixels, clamped to the region read.
    pub fn to_source(&self, b: [f32; 4]) -> [f32; 4] {
        let x = |v: f32| ((v - self.pad_x) * self.inv_scale_x).clamp(0.0, self.src_width) + self.offset_x;
        let y = |v: f32| ((v - self.pad_y) * self.inv_scale_y).clamp(0.0, self.src_height) + self.offset_y;
        [x(b[0]), y(b[1]), x(b[2]), y(b[3])]
    }
}

/// A rectangle of a frame in whole pixels: `x`, `y` of its top-left corner, `width`, `height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self { x, y, width, height }
    }

    /// The whole of a `width` x `height` frame.
    pub fn full(width: u32, height: u32) -> Self {
        Self { x: 0, y: 0, width, height }
    }

    pub fn right(&self) -> u32 {
        self.x + self.width
    }

    pub fn bottom(&self) -> u32 {
        self.y + self.height
    }

    /// This rectangle inside a `width` x `height` frame, its corner moved to even pixels (4:2:0
    /// chroma is shared by 2x2 pixels), cut at the frame's edges, at least 2 x 2; `None` when
    /// nothing of it is in the frame.
    pub fn fitted(&self, width: u32, height: u32) -> Option<Rect> {
        let x0 = self.x.min(width) & !1;
        let y0 = self.y.min(height) & !1;
        let x1 = (x0 + self.width).min(width);
        let y1 = (y0 + self.height).min(height);
        (x1 >= x0 + 2 && y1 >= y0 + 2).then(|| Rect::new(x0, y0, x1 - x0, y1 - y0))
    }
}

/// Per output column (or row): the two source samples and the weight of the second, precomputed
/// once per frame size.
#[derive(Debug, Clone, Default)]
struct Taps {
    i0: Vec<u32>,
    i1: Vec<u32>,
    w: Vec<f32>,
    /// `w` in 1/256ths, for the integer path.
    wq: Vec<u32>,
    /// Outside the letterboxed picture: padding.
    pad: Vec<bool>,
}

impl Taps {
    fn build(out_len: usize, src_len: usize, scale: f32, pad: f32) -> Self {
        let mut t = Taps::default();
        let max = (src_len.max(1) - 1) as f32;
        for o in 0..out_len {
            let inside = (o as f32 + 0.5) >= pad && (o as f32 + 0.5) <= pad + src_len as f32 * scale;
            // Centre-aligned sampling (half-pixel centres), as TF's and OpenCV's bilinear resize.
            let s = ((o as f32 + 0.5 - pad) / scale - 0.5).clamp(0.0, max);
            let i0 = s.floor();
            t.i0.push(i0 as u32);
            t.i1.push((i0 + 1.0).min(max) as u32);
            t.w.push(s - i0);
            t.wq.push(((s - i0) * 256.0).round() as u32);
            t.pad.push(!inside);
        }
        t
    }

    /// The same taps over a region starting `by` samples into the row or column.
    fn offset(mut self, by: u32) -> Self {
        for i in self.i0.iter_mut().chain(self.i1.iter_mut()) {
            *i += by;
        }
        self
    }

    /// Sample indices kept below `len` (a region's last chroma sample of an odd-sized frame).
    fn clamped(mut self, len: u32) -> Self {
        let max = len.max(1) - 1;
        for i in self.i0.iter_mut().chain(self.i1.iter_mut()) {
            *i = (*i).min(max);
        }
        self
    }
}

/// Converts frames to a model's input. Keeps its lookup tables and tensor between frames.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: InputSpec,
    /// Frame size and region the tables below were built for.
    cached_for: (u32, u32, Rect),
    xs: Taps,
    ys: Taps,
    /// Chroma taps for 4:2:0 frames (half resolution).
    cxs: Taps,
    cys: Taps,
    transform: InputTransform,
    rgb: Vec<u8>,
}

impl Preprocessor {
    pub fn new(spec: InputSpec) -> Self {
        Self {
            spec,
            cached_for: (0, 0, Rect::new(0, 0, 0, 0)),
            xs: Taps::default(),
            ys: Taps::default(),
            cxs: Taps::default(),
            cys: Taps::default(),
            transform: InputTransform {
                pad_x: 0.0,
                pad_y: 0.0,
                inv_scale_x: 1.0,
                inv_scale_y: 1.0,
                offset_x: 0.0,
                offset_y: 0.0,
                src_width: 0.0,
                src_height: 0.0,
            },
            rgb: Vec::new(),
        }
    }

    /// Tables for `region` (inside the frame, corner on even pixels) of a `fw` x `fh` frame.
    fn prepare_tables(&mut self, fw: u32, fh: u32, region: Rect) {
        if self.cached_for == (fw, fh, region) {
            return;
        }
        let (w, h) = (region.width, region.height);
        let (iw, ih) = (self.spec.width as f32, self.spec.height as f32);
        let (sx, sy, px, py) = match self.spec.resize {
            ResizeMode::Stretch => (iw / w as f32, ih / h as f32, 0.0, 0.0),
            ResizeMode::Letterbox { .. } => {
                let s = (iw / w as f32).min(ih / h as f32);
                (s, s, (iw - w as f32 * s) / 2.0, (ih - h as f32 * s) / 2.0)
            }
        };
        let (ow, oh) = (self.spec.width as usize, self.spec.height as usize);
        self.xs = Taps::build(ow, w as usize, sx, px).offset(region.x);
        self.ys = Taps::build(oh, h as usize, sy, py).offset(region.y);
        // The region's chroma: its corner is on even pixels, so it starts at half of it.
        let (cw, ch) = (w.div_ceil(2) as usize, h.div_ceil(2) as usize);
        let (fcw, fch) = (fw.div_ceil(2), fh.div_ceil(2));
        self.cxs = Taps::build(ow, cw, sx * 2.0, px).offset(region.x / 2).clamped(fcw);
        self.cys = Taps::build(oh, ch, sy * 2.0, py).offset(region.y / 2).clamped(fch);
        self.transform = InputTransform {
            pad_x: px,
            pad_y: py,
            inv_scale_x: 1.0 / sx,
            inv_scale_y: 1.0 / sy,
            offset_x: region.x as f32,
            offset_y: region.y as f32,
            src_width: w as f32,
            src_height: h as f32,
        };
        self.cached_for = (fw, fh, region);
    }

    /// Fills `out` with `picture` as the model's input; returns the mapping back to the picture.
    pub fn run(&mut self, picture: &Picture<'_>, out: &mut InputTensor) -> InputTransform {
        let (w, h) = picture.size();
        self.run_region(picture, Rect::full(w, h), out)
    }

    /// Fills `out` with `region` of `picture` (fitted into the picture, see [`Rect::fitted`]; the
    /// whole picture when nothing of it is inside) as the model's input; returns the mapping back
    /// to the picture's pixels.
    pub fn run_region(&mut self, picture: &Picture<'_>, region: Rect, out: &mut InputTensor) -> InputTransform {
        let (w, h) = picture.size();
        let region = region.fitted(w, h).unwrap_or(Rect::full(w, h));
        self.prepare_tables(w, h, region);
        let (ow, oh) = (self.spec.width as usize, self.spec.height as usize);
        self.rgb.resize(ow * oh * 3, 0);
        let pad = match self.spec.resize {
            ResizeMode::Letterbox { pad } => pad,
            ResizeMode::Stretch => 0,
        };
        match picture {
            Picture::I420(f) => resample_i420(f, &self.xs, &self.ys, &self.cxs, &self.cys, pad, &mut self.rgb),
            Picture::Rgb { width, data, .. } => {
                resample_rgb(data, *width as usize, &self.xs, &self.ys, pad, &mut self.rgb)
            }
        }
        write_tensor(&self.rgb, &self.spec, out);
        self.transform
    }
}

fn lerp(a: u8, b: u8, w: f32) -> f32 {
    a as f32 + (b as f32 - a as f32) * w
}

/// Bilinear resampling of an I420 frame straight into RGB, in fixed point (8-bit weights) with
/// BT.601 limited-range conversion: the hot path of every detected frame.
fn resample_i420(f: &Frame, xs: &Taps, ys: &Taps, cxs: &Taps, cys: &Taps, pad: u8, rgb: &mut [u8]) {
    let (w, cw) = (f.width as usize, f.width.div_ceil(2) as usize);
    let ow = xs.i0.len();
    let blend = |a: u8, b: u8, wq: u32| a as u32 * (256 - wq) + b as u32 * wq;
    for (oy, row) in rgb.chunks_exact_mut(ow * 3).enumerate() {
        if ys.pad[oy] {
            row.fill(pad);
            continue;
        }
        let (yr0, yr1) = (&f.y[ys.i0[oy] as usize * w..], &f.y[ys.i1[oy] as usize * w..]);
        let (ur0, ur1) = (&f.u[cys.i0[oy] as usize * cw..], &f.u[cys.i1[oy] as usize * cw..]);
        let (vr0, vr1) = (&f.v[cys.i0[oy] as usize * cw..], &f.v[cys.i1[oy] as usize * cw..]);
        let (wy, wc) = (ys.wq[oy], cys.wq[oy]);
        for (ox, px) in row.chunks_exact_mut(3).enumerate() {
            if xs.pad[ox] {
                px.fill(pad);
                continue;
            }
            let (x0, x1, wx) = (xs.i0[ox] as usize, xs.i1[ox] as usize, xs.wq[ox]);
            let (u0, u1, wu) = (cxs.i0[ox] as usize, cxs.i1[ox] as usize, cxs.wq[ox]);
            // Each blend is value x 256; two blends: value x 65536.
            let vertical = |r0: &[u8], r1: &[u8], a: usize, b: usize, wh: u32, wv: u32| {
                ((blend(r0[a], r0[b], wh) * (256 - wv) + blend(r1[a], r1[b], wh) * wv + (1 << 15)) >> 16) as i32
            };
            let luma = vertical(yr0, yr1, x0, x1, wx, wy);
            let u = vertical(ur0, ur1, u0, u1, wu, wc);
            let v = vertical(vr0, vr1, u0, u1, wu, wc);
            let (c, d, e) = (298 * (luma - 16), u - 128, v - 128);
            let q = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
            px[0] = q(c + 409 * e);
            px[1] = q(c - 100 * d - 208 * e);
            px[2] = q(c + 516 * d);
        }
    }
}

fn resample_rgb(data: &[u8], width: usize, xs: &Taps, ys: &Taps, pad: u8, rgb: &mut [u8]) {
    let ow = xs.i0.len();
    for (oy, row) in rgb.chunks_exact_mut(ow * 3).enumerate() {
        if ys.pad[oy] {
            row.fill(pad);
            continue;
        }
        let (r0, r1, wy) = (ys.i0[oy] as usize * width * 3, ys.i1[oy] as usize * width * 3, ys.w[oy]);
        for (ox, px) in row.chunks_exact_mut(3).enumerate() {
            if xs.pad[ox] {
                px.fill(pad);
                continue;
            }
            let (x0, x1, wx) = (xs.i0[ox] as usize * 3, xs.i1[ox] as usize * 3, xs.w[ox]);
            for c in 0..3 {
                let top = lerp(data[r0 + x0 + c], data[r0 + x1 + c], wx);
                let bottom = lerp(data[r1 + x0 + c], data[r1 + x1 + c], wx);
                px[c] = (top + (bottom - top) * wy + 0.5).clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// Interleaved RGB → the tensor's layout, channel order and element type.
fn write_tensor(rgb: &[u8], spec: &InputSpec, out: &mut InputTensor) {
    let shape = spec.shape();
    let n = rgb.len();
    let plane = n / 3;
    let order: [usize; 3] = match spec.colour {
        ColourOrder::Rgb => [0, 1, 2],
        ColourOrder::Bgr => [2, 1, 0],
    };
    match spec.dtype {
        InputType::U8 => {
            let data = match out {
                InputTensor::U8 { data, shape: s } if *s == shape => data,
                _ => {
                    *out = InputTensor::U8 { shape, data: vec![0; n] };
                    let InputTensor::U8 { data, .. } = out else { unreachable!("just set") };
                    data
                }
            };
            match (spec.layout, spec.colour) {
                (Layout::Nhwc, ColourOrder::Rgb) => data.copy_from_slice(rgb),
                (Layout::Nhwc, _) => {
                    for (o, p) in data.chunks_exact_mut(3).zip(rgb.chunks_exact(3)) {
                        o.copy_from_slice(&[p[order[0]], p[order[1]], p[order[2]]]);
                    }
                }
                (Layout::Nchw, _) => {
                    for (i, p) in rgb.chunks_exact(3).enumerate() {
                        for c in 0..3 {
                            data[c * plane + i] = p[order[c]];
                        }
                    }
                }
            }
        }
        InputType::F32 { mean, std } => {
            let data = match out {
                InputTensor::F32 { data, shape: s } if *s == shape => data,
                _ => {
                    *out = InputTensor::F32 { shape, data: vec![0.0; n] };
                    let InputTensor::F32 { data, .. } = out else { unreachable!("just set") };
                    data
                }
            };
            let inv = [1.0 / std[0], 1.0 / std[1], 1.0 / std[2]];
            for (i, p) in rgb.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    let v = (p[order[c]] as f32 - mean[c]) * inv[c];
                    match spec.layout {
                        Layout::Nhwc => data[i * 3 + c] = v,
                        Layout::Nchw => data[c * plane + i] = v,
                    }
                }
            }
        }
    }
}

/// An empty tensor of the right kind for `spec`.
pub fn empty_tensor(spec: &InputSpec) -> InputTensor {
    let shape = spec.shape();
    let n: usize = shape.iter().product();
    if spec.dtype.is_u8() {
        InputTensor::U8 { shape, data: vec![0; n] }
    } else {
        InputTensor::F32 { shape, data: vec![0.0; n] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resize: ResizeMode, layout: Layout, dtype: InputType, colour: ColourOrder) -> InputSpec {
        InputSpec { name: "in".into(), width: 8, height: 8, layout, dtype, colour, resize }
    }

    fn solid_rgb(w: u32, h: u32, px: [u8; 3]) -> Vec<u8> {
        (0..w * h).flat_map(|_| px).collect()
    }

    #[test]
    fn stretch_of_a_solid_picture_keeps_its_colour_in_every_layout() {
        let data = solid_rgb(20, 10, [200, 100, 50]);
        let pic = Picture::Rgb { width: 20, height: 10, data: &data };
        let s = spec(ResizeMode::Stretch, Layout::Nchw, InputType::U8, ColourOrder::Bgr);
        let mut p = Preprocessor::new(s.clone());
        let mut t = empty_tensor(&s);
        p.run(&pic, &mut t);
        let InputTensor::U8 { data, shape } = &t else { panic!("u8") };
        assert_eq!(*shape, [1, 3, 8, 8]);
        // BGR planes.
        assert!(data[..64].iter().all(|&v| v == 50));
        assert!(data[64..128].iter().all(|&v| v == 100));
        assert!(data[128..].iter().all(|&v| v == 200));
    }

    #[test]
    fn letterbox_pads_and_maps_boxes_back() {
        // 16x8 source into 8x8: scale 0.5, picture occupies rows 2..6.
        let data = solid_rgb(16, 8, [10, 20, 30]);
        let pic = Picture::Rgb { width: 16, height: 8, data: &data };
        let s = spec(
            ResizeMode::Letterbox { pad: 114 },
            Layout::Nhwc,
            InputType::F32 { mean: [0.0; 3], std: [255.0; 3] },
            ColourOrder::Rgb,
        );
        let mut p = Preprocessor::new(s.clone());
        let mut t = empty_tensor(&s);
        let tr = p.run(&pic, &mut t);
        let InputTensor::F32 { data, .. } = &t else { panic!("f32") };
        let at = |x: usize, y: usize, c: usize| data[(y * 8 + x) * 3 + c];
        assert!((at(3, 0, 0) - 114.0 / 255.0).abs() < 1e-6, "top rows are padding");
        assert!((at(3, 4, 2) - 30.0 / 255.0).abs() < 1e-6, "middle rows are the picture");
        assert_eq!(tr.pad_y, 2.0);
        let b = tr.to_source([0.0, 2.0, 8.0, 6.0]);
        assert_eq!(b, [0.0, 0.0, 16.0, 8.0]);
    }

    #[test]
    fn i420_grey_converts_to_grey_and_colour_bars_keep_their_hue() {
        // Y=126, U=V=128 is mid grey in BT.601 limited range.
        let (w, h) = (32u32, 16u32);
        let mut f = Frame::blank(w, h);
        f.y.fill(126);
        f.u.fill(128);
        f.v.fill(128);
        let s = spec(ResizeMode::Stretch, Layout::Nhwc, InputType::U8, ColourOrder::Rgb);
        let mut p = Preprocessor::new(s.clone());
        let mut t = empty_tensor(&s);
        p.run(&Picture::I420(&f), &mut t);
        let InputTensor::U8 { data, .. } = &t else { panic!("u8") };
        assert!(data.iter().all(|&v| (127..=128).contains(&v)), "{:?}", &data[..6]);
        // Pure red in BT.601 limited range: Y=81, U=90, V=240.
        f.y.fill(81);
        f.u.fill(90);
        f.v.fill(240);
        p.run(&Picture::I420(&f), &mut t);
        let InputTensor::U8 { data, .. } = &t else { panic!("u8") };
        assert!(data[0] > 240 && data[1] < 15 && data[2] < 15, "{:?}", &data[..3]);
    }
}
