//! Parameter-efficient adapters trained on a frozen base model. Each method
//! matches the Hugging Face PEFT library, so exports load with
//! `PeftModel.from_pretrained` and give the same outputs.

pub mod lora;
pub mod p_tuning;
pub mod prefix;
pub mod prompt_tuning;
