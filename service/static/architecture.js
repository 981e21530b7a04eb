/* Architectures in the browser: the controller's probabilities -> what runs -> its code.
 *
 * Mirrors service/architecture.py: a module runs where its probability is at least the
 * operating point's threshold; a cell with no module is an identity skip where its input
 * and output shapes match (stride 1, same channels), otherwise its first module runs; the
 * code writes each cell's module set as a bit mask (bit m = module m) in base-32 digits,
 * cell 0 first.
 */
(function (global) {
  "use strict";

  const DIGITS = "0123456789abcdefghijklmnopqrstuv";
  const BITS_PER_DIGIT = 5;

  function skippable(cell) {
    return cell.stride === 1 && cell.in_channels === cell.out_channels;
  }

  function numModules(space) {
    return Math.max(...space.cells.map((c) => c.modules.length));
  }

  /* Flat (cells * modules) probabilities -> boolean matrix. The server compares float32
   * probabilities with the threshold in float32 (numpy casts the Python float to the array's
   * type), so the threshold is rounded to float32 here too. */
  function policy(probabilities, space, threshold) {
    const m = numModules(space), t = Math.fround(threshold);
    return space.cells.map((_, c) => Array.from({ length: m }, (_, k) => probabilities[c * m + k] >= t));
  }

  /* service.architecture.apply_empty_cell_rule for one matrix. */
  function applyEmptyCellRule(matrix, space) {
    return matrix.map((row, c) => {
      const out = row.slice();
      if (!row.some(Boolean) && !skippable(space.cells[c])) out[0] = true;
      return out;
    });
  }

  function encode(matrix) {
    const width = Math.ceil(matrix[0].length / BITS_PER_DIGIT);
    let code = "";
    for (const row of matrix) {
      let mask = 0;
      row.forEach((on, m) => { if (on) mask += 2 ** m; });
      for (let d = width - 1; d >= 0; d--) code += DIGITS[Math.floor(mask / 2 ** (BITS_PER_DIGIT * d)) % 32];
    }
    return code;
  }

  function decode(code, numCells, modules) {
    const width = Math.ceil(modules / BITS_PER_DIGIT);
    if (code.length !== numCells * width) throw new Error(`architecture code ${code} does not fit ${numCells} cells`);
    const matrix = [];
    for (let c = 0; c < numCells; c++) {
      let mask = 0;
      for (const ch of code.slice(c * width, (c + 1) * width)) mask = mask * 32 + DIGITS.indexOf(ch.toLowerCase());
      matrix.push(Array.from({ length: modules }, (_, m) => Math.floor(mask / 2 ** m) % 2 === 1));
    }
    return matrix;
  }

  /* The smallest distance of any probability to the threshold: how close a module was to flipping. */
  function margin(probabilities, threshold) {
    let best = Infinity;
    for (const p of probabilities) best = Math.min(best, Math.abs(p - threshold));
    return best;
  }

  global.InstanasArchitecture = { skippable, numModules, policy, applyEmptyCellRule, encode, decode, margin };
})(window);
