// The one helper every view uses: an element with its properties and text.
export function element(tag, properties = {}, text = "") {
  const node = Object.assign(document.createElement(tag), properties);
  if (text) node.textContent = text;
  return node;
}
