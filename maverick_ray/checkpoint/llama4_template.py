"""maverick-ray's own Llama 4 chat template, written into the tiny checkpoints (make-checkpoint).

Written from the documented Llama 4 prompt format (llama-models `models/llama4/prompt_format.md`):

- `<|begin_of_text|>`, then one `<|header_start|>ROLE<|header_end|>\\n\\nCONTENT<|eot|>` per message;
- a leading system message is trimmed;
- with `tools`, the function list (JSON) and the pythonic call instructions go into the first
  user message (`tools_in_user_message`, default true), or, with
  `chat_template_kwargs={"tools_in_user_message": false}`, into the system message;
- an assistant message with `tool_calls` becomes `[name(arg=value, ...), ...]` (Python literals);
- `tool` and `ipython` messages (tool results) become an `ipython` turn;
- image parts become `<|image|>` (the server expands each into its tile/patch layout);
- `add_generation_prompt` opens the assistant turn.

The server never depends on this template: it renders whatever template a checkpoint carries,
through transformers (checkpoint/tokenizer.py). This one only makes the tiny checkpoints behave
like real instruct checkpoints.
"""

LLAMA4_CHAT_TEMPLATE = r"""
{#- maverick-ray Llama 4 chat template (pythonic tool calls), from llama-models' prompt_format.md -#}
{%- macro text_of(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- elif content is mapping -%}{{- content|tojson -}}
  {%- elif content is not none -%}
    {%- for part in content -%}
      {%- if part['type'] == 'text' -%}{{- part['text'] -}}
      {%- elif part['type'] in ['image', 'image_url'] -%}{{- '<|image|>' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro py(v) -%}
  {%- if v is string -%}{{- v|tojson -}}
  {%- elif v is boolean -%}{{- 'True' if v else 'False' -}}
  {%- elif v is none -%}{{- 'None' -}}
  {%- elif v is mapping -%}{{- '{' -}}
    {%- for k, x in v.items() -%}{{- k|tojson ~ ': ' ~ py(x) -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}
    {{- '}' -}}
  {%- elif v is iterable -%}{{- '[' -}}
    {%- for x in v -%}{{- py(x) -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}
    {{- ']' -}}
  {%- else -%}{{- v -}}
  {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if custom_tools is defined and custom_tools -%}{%- set tools = custom_tools -%}{%- endif -%}
{%- if tools is not defined or not tools -%}{%- set tools = none -%}{%- endif -%}
{%- if tools_in_user_message is not defined -%}{%- set tools_in_user_message = true -%}{%- endif -%}
{%- set ns = namespace(functions=[], first_user=-1) -%}
{%- if tools is not none -%}
  {%- for t in tools -%}
    {%- set ns.functions = ns.functions + [t['function'] if t['function'] is defined else t] -%}
  {%- endfor -%}
{%- endif -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_message = text_of(messages[0]['content'])|trim -%}
  {%- set messages = messages[1:] -%}
{%- else -%}
  {%- set system_message = none -%}
{%- endif -%}
{%- if system_message is not none or (tools is not none and not tools_in_user_message) -%}
  {{- '<|header_start|>system<|header_end|>\n\n' -}}
  {%- if system_message is not none -%}{{- system_message -}}{%- endif -%}
  {%- if tools is not none and not tools_in_user_message -%}
    {%- if system_message -%}{{- '\n\n' -}}{%- endif -%}
    {{- 'Here is a list of functions in JSON format that you can invoke.\n\n' -}}
    {{- ns.functions|tojson(indent=4) -}}
    {{- '\n\nTo call functions, answer only in the format [func1(param1=value1, param2=value2), func2(...)].' -}}
    {{- '\nYou can answer general questions or invoke tools when necessary.' -}}
  {%- endif -%}
  {{- '<|eot|>' -}}
{%- endif -%}
{%- if tools is not none and tools_in_user_message -%}
  {%- for message in messages -%}
    {%- if ns.first_user < 0 and message['role'] == 'user' -%}{%- set ns.first_user = loop.index0 -%}{%- endif -%}
  {%- endfor -%}
  {%- if ns.first_user < 0 -%}
    {{- raise_exception('tools go into the first user message, and this conversation has none (or pass chat_template_kwargs {"tools_in_user_message": false})') -}}
  {%- endif -%}
{%- endif -%}
{%- for message in messages -%}
  {%- if message['role'] in ['tool', 'ipython'] -%}
    {{- '<|header_start|>ipython<|header_end|>\n\n' ~ text_of(message['content']) ~ '<|eot|>' -}}
  {%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}
    {{- '<|header_start|>assistant<|header_end|>\n\n' ~ text_of(message['content']) ~ '[' -}}
    {%- for call in message['tool_calls'] -%}
      {%- set f = call['function'] if call['function'] is defined else call -%}
      {{- f['name'] ~ '(' -}}
      {%- if f['arguments'] is mapping -%}
        {%- for k, v in f['arguments'].items() -%}{{- k ~ '=' ~ py(v) -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}
      {%- elif f['arguments'] is defined and f['arguments'] is not none -%}{{- f['arguments'] -}}
      {%- endif -%}
      {{- ')' -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
    {%- endfor -%}
    {{- ']<|eot|>' -}}
  {%- else -%}
    {{- '<|header_start|>' ~ message['role'] ~ '<|header_end|>\n\n' ~ text_of(message['content']) -}}
    {%- if loop.index0 == ns.first_user -%}
      {{- '\nHere is a list of functions in JSON format that you can invoke:\n' -}}
      {{- ns.functions|tojson(indent=4) -}}
      {{- '\n\nShould you decide to return the function call(s), put them in the format of ' ~
          '[func1(params_name=params_value, params_name2=params_value2...), func2(params)]' ~
          '\n\nYou SHOULD NOT include any other text in the response.' -}}
    {%- endif -%}
    {{- '<|eot|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|header_start|>assistant<|header_end|>\n\n' -}}{%- endif -%}
""".strip()
