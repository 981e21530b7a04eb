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
 * - EXIF orientation: the server turns a picture upright by its EXIF Orientation tag wherever
 *   Pillow reads one: a JPEG's APP1 segment, a PNG's eXIf chunk (before or after the pixels), a
 *   WebP's EXIF chunk. Browsers do not all agree (measured, Chromium 156 turns a JPEG and a PNG
 *   whose eXIf comes first, not a PNG whose eXIf follows the pixels, nor a WebP). So this file
 *   reads the tag itself, has the browser decode a copy of the file whose tag is renamed (nothing
 *   left to turn), and turns the decoded pixels as Pillow does: after the draft scaling, before
 *   the resize. (Pillow also takes an orientation from XMP or ImageMagick's "Raw profile type
 *   exif" text when there is no EXIF tag; this file does not.)
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

  function ascii(bytes, at, n) {
    return String.fromCharCode(...bytes.subarray(at, at + n));
  }

  /* Where Pillow finds a file's EXIF block (a TIFF header and IFD0): {start, end} in the file, with
   * {from, to} the bytes a PNG chunk's CRC covers; null where there is none. */
  function exifBlock(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), n = bytes.length;
    let block = null;
    if (isJpeg(bytes)) {  // the first APP1 segment that starts "Exif\0\0", before the first scan
      for (let at = 2; at + 4 <= n && bytes[at] === 0xff && !block;) {
        const marker = bytes[at + 1], end = at + 2 + view.getUint16(at + 2);
        if (marker === 0xda || marker === 0xd9) break;
        if (marker === 0xe1 && ascii(bytes, at + 4, 6) === "Exif\0\0") {
          block = { start: at + 10, end: Math.min(end, n) };
        }
        at = end;
      }
    } else if (ascii(bytes, 0, 8) === "\x89PNG\r\n\x1a\n") {  // every chunk up to IEND: the last eXIf counts
      for (let at = 8; at + 12 <= n;) {
        const length = view.getUint32(at), type = ascii(bytes, at + 4, 4), end = at + 12 + length;
        if (type === "IEND" || end > n) break;
        if (type === "eXIf") block = { start: at + 8, end: end - 4, crc: { from: at + 4, to: end - 4 } };
        at = end;
      }
    } else if (ascii(bytes, 0, 4) === "RIFF" && ascii(bytes, 8, 8) === "WEBPVP8X") {
      // the first EXIF chunk, in the extended format only (libwebp reads no other chunks in a simple file)
      for (let at = 12; at + 8 <= n && !block;) {
        const size = view.getUint32(at + 4, true);
        if (ascii(bytes, at, 4) === "EXIF") block = { start: at + 8, end: Math.min(at + 8 + size, n) };
        at += 8 + size + (size & 1);
      }
    }
    while (block && ascii(bytes, block.start, 6) === "Exif\0\0") block.start += 6;  // some writers repeat the prefix
    return block;
  }

  const INTEGER_TYPES = { 1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4 };  // TIFF type -> bytes (BYTE, SHORT, LONG, signed)
  const TYPE_BYTES = { ...INTEGER_TYPES, 2: 1, 5: 8, 7: 1, 10: 8, 11: 4, 12: 8 };

  /* An EXIF block's Orientation as the server reads it: the first IFD0 entry tagged 0x0112 whose
   * values lie in the block decides, by its first value when of an integer type (anything else, or
   * a value outside 1..8, means upright). Also where every such entry lies. */
  function readOrientation(bytes, start, end) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const order = ascii(bytes, start, 2), little = order === "II", entries = [];
    let orientation = null;
    if ((order !== "II" && order !== "MM") || start + 8 > end || view.getUint16(start + 2, little) !== 42) {
      return { orientation: 1, entries };
    }
    const ifd = start + view.getUint32(start + 4, little);
    const count = ifd + 2 <= end ? view.getUint16(ifd, little) : 0;
    for (let i = 0; i < count && ifd + 14 + 12 * i <= end; i++) {
      const entry = ifd + 2 + 12 * i;
      if (view.getUint16(entry, little) !== 0x0112) continue;
      entries.push(entry);
      const type = view.getUint16(entry + 2, little), n = view.getUint32(entry + 4, little), size = TYPE_BYTES[type];
      const at = size * n <= 4 ? entry + 8 : start + view.getUint32(entry + 8, little);
      if (orientation !== null || !size || n < 1 || at + size * n > end) continue;
      const width = INTEGER_TYPES[type];
      orientation = width === 1 ? bytes[at] : width === 2 ? view.getUint16(at, little)
        : width === 4 ? view.getUint32(at, little) : 1;
    }
    return { orientation: orientation >= 1 && orientation <= 8 ? orientation : 1, entries };
  }

  let crcTable = null;

  /* PNG's CRC-32 of bytes [from, to). */
  function crc32(bytes, from, to) {
    if (!crcTable) {
      crcTable = new Uint32Array(256);
      for (let n = 0; n < 256; n++) {
        let c = n;
        for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
        crcTable[n] = c;
      }
    }
    let c = 0xffffffff;
    for (let i = from; i < to; i++) c = crcTable[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  /* File bytes -> {orientation, bytes}: the EXIF orientation, and the file again with every IFD0
   * Orientation entry renamed to tag 0 (a PNG chunk's CRC redone), for the browser to decode unturned. */
  function takeOrientation(bytes) {
    const block = exifBlock(bytes);
    if (!block) return { orientation: 1, bytes };
    const { orientation, entries } = readOrientation(bytes, block.start, block.end);
    if (!entries.length) return { orientation, bytes };
    const copy = bytes.slice(), view = new DataView(copy.buffer);
    for (const entry of entries) view.setUint16(entry, 0);
    if (block.crc) view.setUint32(block.crc.to, crc32(copy, block.crc.from, block.crc.to));
    return { orientation, bytes: copy };
  }

  /* RGB as stored -> as shown for an EXIF orientation (Pillow's transpositions). The stored pixel
   * shown at (x, y), in stored pixels from `first`: first + x * dx + y * dy. */
  function orient(rgb, width, height, orientation) {
    if (orientation < 2 || orientation > 8) return { rgb, width, height };
    const last = width * height - 1, lastRow = (height - 1) * width;
    const [first, dx, dy] = {
      2: [width - 1, -1, width],  // mirrored: (width-1-x, y)
      3: [last, -1, -width],  // turned 180 degrees: (width-1-x, height-1-y)
      4: [lastRow, 1, -width],  // flipped: (x, height-1-y)
      5: [0, width, 1],  // transposed: (y, x)
      6: [lastRow, -width, 1],  // turned clockwise: (y, height-1-x)
      7: [last, -width, -1],  // transposed the other way: (width-1-y, height-1-x)
      8: [width - 1, width, -1],  // turned anticlockwise: (width-1-y, x)
    }[orientation];
    const w = orientation >= 5 ? height : width, h = orientation >= 5 ? width : height;
    const out = new Uint8ClampedArray(rgb.length);
    for (let y = 0, o = 0; y < h; y++) {
      for (let x = 0, s = first + y * dy; x < w; x++, s += dx, o += 3) {
        out[o] = rgb[s * 3];
        out[o + 1] = rgb[s * 3 + 1];
        out[o + 2] = rgb[s * 3 + 2];
      }
    }
    return { rgb: out, width: w, height: h };
  }

  /* Decoded RGBA, as stored -> (size, size, 3) uint8 as service.imaging.to_pixels gives it: a JPEG's
   * draft scale, then the EXIF orientation, then the resize. */
  function toPixels(rgba, width, height, size, jpeg, orientation = 1) {
    let rgb = rgbaToRGB(rgba, width, height), w = width, h = height, draft = 1;
    if (jpeg) {
      draft = draftScale(w, h, size);
      if (draft > 1) ({ rgb, width: w, height: h } = blockMean(rgb, w, h, draft));
    }
    ({ rgb, width: w, height: h } = orient(rgb, w, h, orientation));
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

  /* A Blob -> decoded RGBA at its own size (turned as the browser sees fit: see takeOrientation). */
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

  /* Blob -> {input: Float32Array NCHW, pixels: the resized RGB bytes, width, height (as shown),
   * draft, orientation}. */
  async function prepare(blob, pre) {
    const file = new Uint8Array(await blob.arrayBuffer());
    const { orientation, bytes } = takeOrientation(file);
    const { rgba, width, height } = await decode(bytes === file ? blob : new Blob([bytes], { type: blob.type }));
    const size = pre.input_size;
    const { pixels, draft } = toPixels(rgba, width, height, size, isJpeg(file), orientation);
    const turned = orientation >= 5;
    return { input: toInput(pixels, size, pre), pixels, width: turned ? height : width,
             height: turned ? width : height, draft, orientation };
  }

  global.InstanasPreprocess = { coefficients, resizeRGB, rgbaToRGB, draftScale, blockMean, exifBlock, readOrientation,
                                takeOrientation, orient, toPixels, toInput, decode, prepare };
})(window);
