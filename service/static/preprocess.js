/* Image bytes -> the bundle's input tensor, in the browser, as the server prepares it.
 *
 * The server (service/imaging.py) decodes with Pillow, decodes a large JPEG at a reduced
 * scale (Pillow's draft mode), composites transparency over white, resizes with Pillow's
 * BILINEAR filter and normalises in float32. A canvas resize is not Pillow's bilinear
 * filter, so this file does the resize itself on the decoded RGBA pixels:
 *
 * - Pillow resamples separably, one axis then the other (which first: verticalFirst),
 *   each output pixel a weighted sum over the input pixels within the filter's support.
 *   The triangle filter has support 1 at upscaling; when downscaling by a factor f it is
 *   stretched to f input pixels on each side (an area-like average), so a 97-pixel row
 *   shrunk to 32 mixes up to 7 pixels per output, not 2 as textbook bilinear would.
 * - Weights are normalised per output pixel, then turned into 22-bit fixed point
 *   (round half away from zero); sums start at half a unit, and every pass rounds and
 *   clips to 8 bits. A pass is skipped when its side does not change.
 * - Draft mode: a JPEG at least 2x the target on both sides is decoded by libjpeg at 1/2,
 *   1/4 or 1/8 scale (the largest that keeps both sides >= the target). libjpeg scales in
 *   the DCT domain, close to a mean over s x s blocks; the browser decodes at full size, so
 *   the mean over s x s blocks stands in for it (not exact: libjpeg averages before its
 *   colour conversion and rounding; measured, a few levels on some pixels).
 *
 * The float32 normalisation repeats numpy's: (v * scale - mean) / std, every step rounded
 * to float32.
 */
(function (global) {
  "use strict";

  const PRECISION_BITS = 32 - 8 - 2;
  const ONE = 1 << PRECISION_BITS;
  const BACKGROUND = [255, 255, 255];

  function triangle(x) {
    if (x < 0) x = -x;
    return x < 1 ? 1 - x : 0;
  }

  /* Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis. */
  function coefficients(inSize, outSize) {
    const scale = inSize / outSize;
    const filterscale = scale < 1 ? 1 : scale;
    const support = 1.0 * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const kk = new Int32Array(outSize * ksize);
    const w = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const ss = 1.0 / filterscale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0;
      for (let x = 0; x < xmax; x++) {
        w[x] = triangle((x + xmin - center + 0.5) * ss);
        ww += w[x];
      }
      for (let x = 0; x < xmax; x++) {
        const k = ww !== 0 ? w[x] / ww : w[x];
        kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
      }
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    return { ksize, bounds, kk };
  }

  function clip8(v) {
    if (v >= ONE * 256) return 255;
    if (v <= 0) return 0;
    return Math.floor(v / ONE);
  }

  /* One horizontal pass: rows [first, first + rows) of a (width x ...) RGB picture -> (outW x rows). */
  function horizontalPass(src, width, first, rows, outW, c) {
    const out = new Uint8ClampedArray(outW * rows * 3);
    for (let y = 0; y < rows; y++) {
      const row = (y + first) * width * 3;
      for (let xx = 0; xx < outW; xx++) {
        const xmin = c.bounds[xx * 2], xmax = c.bounds[xx * 2 + 1], k = xx * c.ksize;
        let s0 = ONE / 2, s1 = ONE / 2, s2 = ONE / 2;
        for (let x = 0; x < xmax; x++) {
          const p = row + (x + xmin) * 3, w = c.kk[k + x];
          s0 += src[p] * w;
          s1 += src[p + 1] * w;
          s2 += src[p + 2] * w;
        }
        const o = (y * outW + xx) * 3;
        out[o] = clip8(s0);
        out[o + 1] = clip8(s1);
        out[o + 2] = clip8(s2);
      }
    }
    return out;
  }

  /* One vertical pass: a (width x ...) RGB picture whose row 0 is source row `shift` -> (width x outH). */
  function verticalPass(src, width, shift, outH, c) {
    const out = new Uint8ClampedArray(width * outH * 3);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = c.bounds[yy * 2] - shift, ymax = c.bounds[yy * 2 + 1], k = yy * c.ksize;
      for (let xx = 0; xx < width; xx++) {
        let s0 = ONE / 2, s1 = ONE / 2, s2 = ONE / 2;
        for (let y = 0; y < ymax; y++) {
          const p = ((y + ymin) * width + xx) * 3, w = c.kk[k + y];
          s0 += src[p] * w;
          s1 += src[p + 1] * w;
          s2 += src[p + 2] * w;
        }
        const o = (yy * width + xx) * 3;
        out[o] = clip8(s0);
        out[o + 1] = clip8(s1);
        out[o + 2] = clip8(s2);
      }
    }
    return out;
  }

  /* Which pass Pillow runs first. Every pass rounds to 8 bits, so the order shows in the result.
   * Measured on Pillow 13 (the server's; tests/test_demo.py holds this to it on random sizes): the
   * vertical pass comes first when the picture shrinks vertically and 2 (w - outW) < h - outH;
   * otherwise, as in every earlier release, the horizontal one. */
  function verticalFirst(width, height, outW, outH) {
    return height > outH && 2 * (width - outW) < height - outH;
  }

  /* Pillow's Image.resize((outW, outH), BILINEAR) of an RGB picture held as (w*h*3) bytes. */
  function resizeRGB(rgb, width, height, outW, outH) {
    if (width === outW && height === outH) return Uint8ClampedArray.from(rgb);
    if (width === outW) return verticalPass(rgb, width, 0, outH, coefficients(height, outH));
    const horiz = coefficients(width, outW);
    if (height === outH) return horizontalPass(rgb, width, 0, height, outW, horiz);
    const vert = coefficients(height, outH);
    if (verticalFirst(width, height, outW, outH)) {
      return horizontalPass(verticalPass(rgb, width, 0, outH, vert), width, 0, outH, outW, horiz);
    }
    const first = vert.bounds[0], last = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1];
    return verticalPass(horizontalPass(rgb, width, first, last - first, outW, horiz), outW, first, outH, vert);
  }

  /* RGBA (not premultiplied) -> RGB over white, as Pillow's paste(rgba, mask=rgba) rounds it. */
  function rgbaToRGB(rgba, width, height) {
    const n = width * height, rgb = new Uint8ClampedArray(n * 3);
    for (let i = 0; i < n; i++) {
      const a = rgba[i * 4 + 3];
      for (let c = 0; c < 3; c++) {
        const v = rgba[i * 4 + c];
        if (a === 255) {
          rgb[i * 3 + c] = v;
        } else {
          const t = BACKGROUND[c] * (255 - a) + v * a + 128;
          rgb[i * 3 + c] = ((t >> 8) + t) >> 8;
        }
      }
    }
    return rgb;
  }

  /* The scale Pillow's JpegImageFile.draft picks for a target side: 8, 4, 2 or 1. */
  function draftScale(width, height, target) {
    const scale = Math.min(Math.floor(width / target), Math.floor(height / target));
    for (const s of [8, 4, 2]) if (scale >= s) return s;
    return 1;
  }

  /* Mean over s x s blocks (the last ones partial), rounded half up: libjpeg's reduced decode. */
  function blockMean(rgb, width, height, s) {
    const outW = Math.ceil(width / s), outH = Math.ceil(height / s);
    const out = new Uint8ClampedArray(outW * outH * 3);
    for (let by = 0; by < outH; by++) {
      const y1 = Math.min(height, (by + 1) * s);
      for (let bx = 0; bx < outW; bx++) {
        const x1 = Math.min(width, (bx + 1) * s);
        let s0 = 0, s1 = 0, s2 = 0, n = 0;
        for (let y = by * s; y < y1; y++) {
          for (let x = bx * s; x < x1; x++) {
            const p = (y * width + x) * 3;
            s0 += rgb[p]; s1 += rgb[p + 1]; s2 += rgb[p + 2]; n++;
          }
        }
        const o = (by * outW + bx) * 3;
        out[o] = Math.floor((s0 + n / 2) / n);
        out[o + 1] = Math.floor((s1 + n / 2) / n);
        out[o + 2] = Math.floor((s2 + n / 2) / n);
      }
    }
    return { rgb: out, width: outW, height: outH };
  }

  function isJpeg(bytes) {
    return bytes.length > 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff;
  }

  /* Decoded RGBA -> (size, size, 3) uint8 as service.imaging.to_pixels gives it. */
  function toPixels(rgba, width, height, size, jpeg) {
    let rgb = rgbaToRGB(rgba, width, height), w = width, h = height, draft = 1;
    if (jpeg) {
      draft = draftScale(w, h, size);
      if (draft > 1) ({ rgb, width: w, height: h } = blockMean(rgb, w, h, draft));
    }
    return { pixels: resizeRGB(rgb, w, h, size, size), draft };
  }

  /* (size, size, 3) uint8 -> (1, 3, size, size) float32, as service.imaging.to_input. */
  function toInput(pixels, size, pre) {
    const f = Math.fround, scale = f(pre.scale), plane = size * size;
    const mean = pre.mean.map(f), std = pre.std.map(f);
    const x = new Float32Array(3 * plane);
    for (let i = 0; i < plane; i++) {
      for (let c = 0; c < 3; c++) x[c * plane + i] = f(f(f(pixels[i * 3 + c] * scale) - mean[c]) / std[c]);
    }
    return x;
  }

  /* A Blob (file or fetched image) -> decoded RGBA at its own size, EXIF orientation applied. */
  async function decode(blob) {
    const bitmap = await createImageBitmap(blob, {
      imageOrientation: "from-image", premultiplyAlpha: "none", colorSpaceConversion: "none",
    });
    const { width, height } = bitmap;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    return { rgba: ctx.getImageData(0, 0, width, height).data, width, height };
  }

  /* Blob -> {input: Float32Array NCHW, pixels: the resized RGB bytes, width, height, draft}. */
  async function prepare(blob, pre) {
    const head = new Uint8Array(await blob.slice(0, 4).arrayBuffer());
    const { rgba, width, height } = await decode(blob);
    const size = pre.input_size;
    const { pixels, draft } = toPixels(rgba, width, height, size, isJpeg(head));
    return { input: toInput(pixels, size, pre), pixels, width, height, draft };
  }

  global.InstanasPreprocess = { coefficients, resizeRGB, rgbaToRGB, draftScale, blockMean, toPixels, toInput, decode,
                                prepare };
})(window);
