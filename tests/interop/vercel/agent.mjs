// A Vercel AI SDK tool loop against Sovereign (the Responses API, store: true):
// generateText, then streamText, each with one weather tool. Prints one JSON
// line per loop: its text, reasoning, tool executions and the request inputs.
// Env: SOVEREIGN_V1 (base URL ending in /v1), SOVEREIGN_KEY.
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, stepCountIs, streamText, tool } from 'ai';
import { z } from 'zod';

const inputs = [];
const openai = createOpenAI({
  baseURL: process.env.SOVEREIGN_V1,
  apiKey: process.env.SOVEREIGN_KEY,
  fetch: async (url, init) => {
    inputs.push(JSON.parse(init.body).input);
    return fetch(url, init);
  },
});

function weather(counter) {
  return {
    get_weather: tool({
      description: 'The weather in a city',
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => {
        counter.calls += 1;
        return `sunny in ${city}`;
      },
    }),
  };
}

const model = openai('sovereign-alpha');
const prompt = 'What is the weather in Paris?';

let counter = { calls: 0 };
inputs.length = 0;
const generated = await generateText({ model, tools: weather(counter), prompt, stopWhen: stepCountIs(4) });
console.log(JSON.stringify({
  loop: 'generateText', text: generated.text, calls: counter.calls,
  reasoning: generated.steps.map((step) => step.reasoningText ?? ''), inputs: [...inputs],
}));

counter = { calls: 0 };
inputs.length = 0;
const streamed = streamText({ model, tools: weather(counter), prompt, stopWhen: stepCountIs(4) });
let reasoning = '';
for await (const part of streamed.fullStream) {
  if (part.type === 'reasoning-delta') reasoning += part.text;
  if (part.type === 'error') throw part.error;
}
console.log(JSON.stringify({
  loop: 'streamText', text: await streamed.text, calls: counter.calls, reasoning: [reasoning], inputs: [...inputs],
}));
