// The official `openai` npm client against `loom serve` (tests/e2e/test_openai_client.sh):
// models.list, a chat completion, a streamed chat completion with usage, a completion, a
// streamed completion, and a 404 surfacing as the SDK's NotFoundError.
//   node openai_client.cjs BASE_URL API_KEY
const { OpenAI } = require('openai');

const [base, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base + '/v1', apiKey, maxRetries: 0, timeout: 30000 });

function check(cond, msg) {
    if (!cond) throw new Error(msg);
}

async function main() {
    const models = await client.models.list();
    const model = models.data[0].id;
    check(typeof model === 'string' && model.length > 0, 'models.list: no id');
    console.log(`models.list: ${model}`);

    const chat = await client.chat.completions.create({
        model, messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Say hello.' }],
        max_tokens: 8, temperature: 0,
    });
    check(chat.object === 'chat.completion', `chat: object ${chat.object}`);
    check(chat.choices.length === 1 && chat.choices[0].message.role === 'assistant', 'chat: message');
    check(typeof chat.choices[0].message.content === 'string', 'chat: content');
    check(['stop', 'length'].includes(chat.choices[0].finish_reason), 'chat: finish_reason');
    check(chat.usage.completion_tokens >= 1 && chat.usage.completion_tokens <= 8, 'chat: usage');
    console.log(`chat: ${JSON.stringify(chat.choices[0].message.content)} (${chat.usage.completion_tokens} tokens)`);

    const stream = await client.chat.completions.create({
        model, messages: [{ role: 'user', content: 'Count to five.' }], max_tokens: 12,
        stream: true, stream_options: { include_usage: true }, ignore_eos: true,
    });
    let text = '', role = null, finish = null, usage = null, chunks = 0;
    for await (const chunk of stream) {
        chunks++;
        check(chunk.object === 'chat.completion.chunk', `stream: object ${chunk.object}`);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices) {
            if (c.delta.role) role = c.delta.role;
            if (c.delta.content) text += c.delta.content;
            if (c.finish_reason) finish = c.finish_reason;
        }
    }
    check(role === 'assistant', 'stream: no assistant role');
    check(finish === 'length', `stream: finish_reason ${finish} (ignore_eos)`);
    check(usage && usage.completion_tokens === 12, `stream: usage ${JSON.stringify(usage)}`);
    console.log(`streamed chat: ${chunks} chunks, ${JSON.stringify(text)}`);

    const completion = await client.completions.create({
        model, prompt: 'Once upon a time', max_tokens: 6, ignore_eos: true, logprobs: 1,
    });
    check(completion.object === 'text_completion', `completion: object ${completion.object}`);
    check(typeof completion.choices[0].text === 'string', 'completion: text');
    check(completion.usage.completion_tokens === 6, 'completion: usage');
    check(completion.choices[0].logprobs.tokens.length === 6, 'completion: logprobs');
    console.log(`completion: ${JSON.stringify(completion.choices[0].text)}`);

    const cstream = await client.completions.create({
        model, prompt: 'Once upon a time', max_tokens: 5, ignore_eos: true, stream: true,
    });
    let ctext = '', cfinish = null;
    for await (const chunk of cstream) {
        ctext += chunk.choices[0]?.text || '';
        if (chunk.choices[0]?.finish_reason) cfinish = chunk.choices[0].finish_reason;
    }
    check(cfinish === 'length', 'streamed completion: finish_reason');
    console.log(`streamed completion: ${JSON.stringify(ctext)}`);

    let caught = null;
    try {
        await client.completions.create({ model: 'no-such-model', prompt: 'x', max_tokens: 1 });
    } catch (e) {
        caught = e;
    }
    check(caught instanceof OpenAI.NotFoundError && caught.status === 404,
          `unknown model: want NotFoundError, got ${caught}`);
    check(caught.error && caught.error.code === 'model_not_found', 'unknown model: error body');
    caught = null;
    try {
        await new OpenAI({ baseURL: base + '/v1', apiKey: 'wrong', maxRetries: 0 }).models.list();
    } catch (e) {
        caught = e;
    }
    check(caught instanceof OpenAI.AuthenticationError, `wrong key: want AuthenticationError, got ${caught}`);
    console.log('errors map to the SDK\'s NotFoundError and AuthenticationError');
}

main().then(() => console.log('PASS'), (e) => {
    console.error(`FAIL: ${e.stack || e}`);
    process.exit(1);
});
