"""The few paragraphs the built-in demo model learns at build time (cadenza.demo), written for this project.

It opens with `cadenza run`'s default prompt, "Once upon a time", so the demo's greedy continuation of that prompt
is this story; other prompts get words from it too, in a more scrambled order.
"""

DEMO_TEXT = """\
Once upon a time, there was a small inference engine called cadenza. It lived on a computer with one modest \
graphics card and a great deal of ordinary memory, and it wanted to run models that were far too large to fit \
on the card.

The models were a mixture of experts. Each layer of such a model holds many experts, small feed forward \
networks, and a router that picks only a few of them for every token. Most of the weights sit idle most of the \
time. That was the secret cadenza knew: a model can be much larger than the card, as long as the experts that \
a token needs are on the card when the token needs them.

So cadenza kept the attention layers, the router and the embeddings on the card, and it kept the experts in \
host memory. When a token arrived, the router named its experts, and cadenza moved those experts to the card \
while the card was still busy with the previous layer. It remembered which experts were used often and kept \
them close, in a cache on the card, so that the same expert was not copied twice in a row.

Sometimes the card was too small even for the cache. Then cadenza asked the processor to help. The processor \
computed the rare experts where they already lived, in host memory, with a kernel written for it, while the card \
computed the popular ones. Nothing waited for long, and every token still found its experts.

The experts could also be made smaller. Cadenza packed their weights into eight or four bits, kept the packed \
copies on the disk for the next time, and read them back in a moment. A smaller expert moves faster, and more \
of them fit in the cache.

People asked cadenza to write stories, to answer questions, and to serve many users at once. It listened on a \
port and spoke the same language as the popular services, so their programs worked without a change. It \
streamed each word as soon as it was ready, and it told them how many tokens it made in every second.

This little model is the demo that comes with cadenza. It was trained for a few seconds on these paragraphs, \
the first time it was needed, so it can only tell this one story. It is a mixture of experts too, with a \
router and a few experts in each layer, and it is loaded, routed and decoded exactly like a real model. To run \
a real one, pass a model name from the hub, and cadenza will fetch it and tell a better story.
"""
