"""archc.ir"""
