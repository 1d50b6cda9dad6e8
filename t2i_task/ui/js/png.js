// The parameters that made an image, read from its own PNG: the server writes each one
// (prompt, seed, steps, ...) as a text chunk (t2i_task/task.py), so an image carries its
// settings wherever it goes.

const SIGNATURE_BYTES = 8;
const utf8 = new TextDecoder("utf-8");
const latin1 = new TextDecoder("latin1");

// {keyword: text} of a PNG's uncompressed tEXt and iTXt chunks.
export function pngText(buffer) {
  const view = new DataView(buffer);
  const bytes = new Uint8Array(buffer);
  const found = {};
  let offset = SIGNATURE_BYTES;
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = latin1.decode(bytes.subarray(offset + 4, offset + 8));
    const data = bytes.subarray(offset + 8, offset + 8 + length);
    if (type === "IEND") break;
    const keywordEnd = data.indexOf(0);
    if (keywordEnd > 0 && (type === "tEXt" || type === "iTXt")) {
      const keyword = latin1.decode(data.subarray(0, keywordEnd));
      if (type === "tEXt") {
        found[keyword] = latin1.decode(data.subarray(keywordEnd + 1));
      } else if (data[keywordEnd + 1] === 0) { // iTXt, not compressed: language\0 translated\0 text
        const languageEnd = data.indexOf(0, keywordEnd + 3);
        const translatedEnd = data.indexOf(0, languageEnd + 1);
        found[keyword] = utf8.decode(data.subarray(translatedEnd + 1));
      }
    }
    offset += 12 + length; // length, type, data, CRC
  }
  return found;
}
